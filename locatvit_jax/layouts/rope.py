"""The authors' RoPE-Mixed layout <-> ours: their LocAtRoPEViT and timm's Eva (`*_rope_mixed`).

The state dict is timm Eva's with `attn_type='rope'` (fused qkv with its bias), plus `rope.freqs`
(2, depth, heads, head_dim / 2), the layer scales `gamma_1`, `gamma_2`, and the authors' GAug layers.
There is no position embedding, so the image size (GAug's grid constants) comes from config.json, else
the authors' default, 224. PRR has no tensors: config.json's architecture (locatvit_*: on) or
model_args.prr says it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from locatvit_jax.layouts import rules
from locatvit_jax.layouts import vit as vit_layout
from locatvit_jax.models import rope

FAMILY = rope.FAMILY

TABLE = rules.RuleTable(vit_layout.PATCH_EMBED_RULES + vit_layout.BLOCK_RULES + [
    ('cls_token', 'cls_token', 'none'),
    ('rope.freqs', 'rope/freqs', 'none'),
    ('blocks.{i}.gamma_1', 'blocks/{i}/gamma_1', 'none'),
    ('blocks.{i}.gamma_2', 'blocks/{i}/gamma_2', 'none'),
    ('norm.weight', 'norm/scale', 'none'),
    ('norm.bias', 'norm/bias', 'none'),
    ('head.weight', 'head/kernel', 'linear'),
    ('head.bias', 'head/bias', 'none'),
])


def to_ours(state: dict[str, np.ndarray], cfg: rope.RoPEConfig) -> dict[str, np.ndarray]:
  del cfg  # one layout for every RoPE config
  return TABLE.to_ours(state, what=' (RoPE-Mixed ViT)')


def to_timm(flat: dict[str, np.ndarray], cfg: rope.RoPEConfig) -> dict[str, np.ndarray]:
  del cfg
  return TABLE.to_timm(flat)


def _named(hf: dict) -> str:
  name = str(hf.get('architecture', ''))
  return rope.MODEL_ALIASES.get(name, name)


def claims(state: dict, hf: dict) -> bool:
  """By config.json's architecture name, else by the rotary frequencies no other family has."""
  return _named(hf) in rope.MODEL_NAMES or 'rope.freqs' in state


# -- config.json: timm's hub format -------------------------------------------------------------------
# model_args (the kwargs of timm's Eva and the authors' LocAtRoPEViT) that are RoPEConfig fields.
_RENAMED_ARGS = {'img_size': 'img_size', 'patch_size': 'patch_size', 'embed_dim': 'width', 'depth': 'depth',
                 'num_heads': 'num_heads', 'num_classes': 'num_classes', 'gaug': 'gaug', 'prr': 'prr',
                 'init_values': 'init_values', 'rope_temperature': 'rope_temperature'}


def _tensor_fields(state: dict[str, np.ndarray]) -> dict[str, Any]:
  for key in ('patch_embed.proj.weight', 'rope.freqs', 'blocks.0.mlp.fc1.weight'):
    if key not in state:
      raise ValueError(f'not a RoPE-Mixed ViT state dict: no {key} among '
                       f'{sorted(state)[:8]}{"..." if len(state) > 8 else ""}')
  width, _, patch, _ = state['patch_embed.proj.weight'].shape
  _, depth, heads, _ = state['rope.freqs'].shape
  blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r'blocks\.(\d+)\.', k)))
  if blocks != depth:
    raise ValueError(f'rope.freqs has {depth} blocks of frequencies; the state dict has {blocks} blocks')
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=state['blocks.0.mlp.fc1.weight'].shape[0],
              patch_size=patch, num_classes=state['head.weight'].shape[0] if 'head.weight' in state else 0,
              gaug='blocks.0.attn.gaug.log_var.weight' in state, drop_path=0.0)


def fields(state: dict[str, np.ndarray], hf: dict) -> dict[str, Any]:
  """RoPEConfig fields from the tensors, then what config.json states (its architecture name fixes PRR:
  the authors' locatvit_*_rope_mixed always have it, timm's vit_*_rope_mixed never)."""
  out = _tensor_fields(state)
  name = _named(hf)
  if name in rope.MODEL_NAMES:
    out['prr'] = name.startswith('locatvit_')
  if 'input_size' in hf.get('pretrained_cfg', {}):
    out['img_size'] = hf['pretrained_cfg']['input_size'][1:]
  args = {**hf, **hf.get('model_args', {})}
  out.update({ours: args[key] for key, ours in _RENAMED_ARGS.items() if key in args})
  if 'mlp_ratio' in args:
    out['mlp_dim'] = round(args['mlp_ratio'] * out['width'])
  return out


def config(fields: dict[str, Any], state: dict[str, np.ndarray]) -> rope.RoPEConfig:
  del state  # no position embedding: an unstated image size is the authors' default, RoPEConfig's 224
  return rope.RoPEConfig.from_dict(fields)


def architecture(cfg: rope.RoPEConfig) -> str:
  """The authors' name of cfg's constructor (LocAtRoPEViT for GAug and/or PRR, else timm's Eva) at cfg's
  size where one is registered, else at tiny (model_args carry the real sizes)."""
  kind = 'locatvit' if cfg.gaug or cfg.prr else 'vit'
  sizes = [size for size, spec in rope.SIZES.items() if spec[:4] == (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim)]
  ours = f'{kind}_{(sizes or ["tiny"])[0]}_rope_mixed'
  return next((alias for alias, name in rope.MODEL_ALIASES.items() if name == ours), ours)


def _model_args(cfg: rope.RoPEConfig) -> dict:
  """Every architecture field as the constructor's kwargs. gaug/prr only where they differ from the
  constructor's (an ablation): neither LocAtRoPEViT (both always on) nor Eva (neither) takes them."""
  args = dict(img_size=list(cfg.img_size), patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, init_values=cfg.init_values,
              rope_temperature=cfg.rope_temperature)
  locat = cfg.gaug or cfg.prr
  if (cfg.gaug, cfg.prr) != (locat, locat):
    args.update(gaug=cfg.gaug, prr=cfg.prr)
  return args


def hf_config(cfg: rope.RoPEConfig) -> dict:
  """config.json as timm's save_config_for_hf lays it out; fields() reads it back."""
  return dict(architecture=architecture(cfg), num_classes=cfg.num_classes, num_features=cfg.width,
              global_pool='token', model_args=_model_args(cfg), pretrained_cfg=vit_layout.pretrained_cfg(cfg))
