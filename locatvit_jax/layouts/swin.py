"""The authors' (and timm's) Swin layout <-> ours: LocAt Swin and plain Swin.

timm 1.0.19 saves no buffers for Swin (`relative_position_index` and `attn_mask` are non-persistent;
models/swin.py recomputes both); checkpoints from older code that still hold them have them dropped
here. The tensors tell every size (per-stage depth and heads from the relative position tables) and
GAug; config.json tells what they cannot: PRR, the image size and the window (which fix every block's
window and shift).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from locatvit_jax.layouts import rules
from locatvit_jax.layouts import vit as vit_layout
from locatvit_jax.models import swin

FAMILY = swin.FAMILY

_BLOCK = 'layers.{i}.blocks.{j}.'
_OURS = 'layers/{i}/blocks/{j}/'
TABLE = rules.RuleTable([
    ('patch_embed.proj.weight', 'patch_embed/proj/kernel', 'conv'),
    ('patch_embed.proj.bias', 'patch_embed/proj/bias', 'none'),
    ('patch_embed.norm.weight', 'patch_embed/norm/scale', 'none'),
    ('patch_embed.norm.bias', 'patch_embed/norm/bias', 'none'),
    ('layers.{i}.downsample.norm.weight', 'layers/{i}/downsample/norm/scale', 'none'),
    ('layers.{i}.downsample.norm.bias', 'layers/{i}/downsample/norm/bias', 'none'),
    ('layers.{i}.downsample.reduction.weight', 'layers/{i}/downsample/reduction/kernel', 'linear'),
    (_BLOCK + 'norm1.weight', _OURS + 'norm1/scale', 'none'),
    (_BLOCK + 'norm1.bias', _OURS + 'norm1/bias', 'none'),
    (_BLOCK + 'attn.qkv.weight', _OURS + 'attn/qkv/kernel', 'linear'),
    (_BLOCK + 'attn.qkv.bias', _OURS + 'attn/qkv/bias', 'none'),
    (_BLOCK + 'attn.proj.weight', _OURS + 'attn/proj/kernel', 'linear'),
    (_BLOCK + 'attn.proj.bias', _OURS + 'attn/proj/bias', 'none'),
    (_BLOCK + 'attn.relative_position_bias_table', _OURS + 'attn/relative_position_bias_table', 'none'),
    (_BLOCK + 'attn.gaug.log_var.weight', _OURS + 'attn/gaug/var_proj/kernel', 'linear'),
    (_BLOCK + 'attn.gaug.log_var.bias', _OURS + 'attn/gaug/var_proj/bias', 'none'),
    (_BLOCK + 'attn.gaug.log_alpha.weight', _OURS + 'attn/gaug/alpha_proj/kernel', 'linear'),
    (_BLOCK + 'attn.gaug.log_alpha.bias', _OURS + 'attn/gaug/alpha_proj/bias', 'none'),
    (_BLOCK + 'norm2.weight', _OURS + 'norm2/scale', 'none'),
    (_BLOCK + 'norm2.bias', _OURS + 'norm2/bias', 'none'),
    (_BLOCK + 'mlp.fc1.weight', _OURS + 'mlp/fc1/kernel', 'linear'),
    (_BLOCK + 'mlp.fc1.bias', _OURS + 'mlp/fc1/bias', 'none'),
    (_BLOCK + 'mlp.fc2.weight', _OURS + 'mlp/fc2/kernel', 'linear'),
    (_BLOCK + 'mlp.fc2.bias', _OURS + 'mlp/fc2/bias', 'none'),
    ('norm.weight', 'norm/scale', 'none'),
    ('norm.bias', 'norm/bias', 'none'),
    ('head.fc.weight', 'head/kernel', 'linear'),
    ('head.fc.bias', 'head/bias', 'none'),
])
# Buffers that older Swin code saved; recomputed from the window (models/swin.py), never params.
_BUFFERS = re.compile(r'.*\.(relative_position_index|attn_mask)$')
_TELLTALE = 'layers.0.blocks.0.attn.relative_position_bias_table'


def _params_only(state: dict) -> dict:
  return {k: v for k, v in state.items() if not _BUFFERS.match(k)}


def to_ours(state: dict[str, np.ndarray], cfg: swin.SwinConfig) -> dict[str, np.ndarray]:
  del cfg  # one layout for every Swin
  return TABLE.to_ours(_params_only(state), what=' (a Swin state dict)')


def to_timm(flat: dict[str, np.ndarray], cfg: swin.SwinConfig) -> dict[str, np.ndarray]:
  del cfg
  return TABLE.to_timm(flat)


def _architecture(hf: dict) -> str:
  return str(hf.get('architecture', ''))


def claims(state: dict, hf: dict) -> bool:
  """config.json names a Swin (ours, the authors' or timm's spelling), or the tensors have Swin's stages."""
  name = _architecture(hf)
  return name in swin.MODEL_NAMES or name in swin.MODEL_ALIASES or _TELLTALE in state


# -- config.json: timm's hub format -------------------------------------------------------------------
# model_args (the kwargs of timm's SwinTransformer and the authors' LocAtSwin) that are SwinConfig fields
# under the same name; gaug and prr are ours (the authors' class always has both).
_ARGS = ('img_size', 'patch_size', 'embed_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio', 'num_classes',
         'gaug', 'prr')
_SIZE_FIELDS = ('embed_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio', 'patch_size')


def _is_locat(cfg: swin.SwinConfig) -> bool:
  return cfg.gaug or cfg.prr


def architecture(cfg: swin.SwinConfig) -> str:
  """The authors' locatswin_* for any LocAt switch, timm's swin_*_patch4_window7_224 without; at cfg's size
  where one is registered, else the tiny name (model_args carry the real sizes)."""
  names = ([n for n in swin.MODEL_NAMES if n.startswith('locatswin_')] if _is_locat(cfg)
           else list(swin.MODEL_ALIASES))
  size = lambda c: tuple(getattr(c, f) for f in _SIZE_FIELDS)
  return next((n for n in names if size(swin.model_config(n)) == size(cfg)), names[0])


def hf_config(cfg: swin.SwinConfig) -> dict:
  """config.json as timm's save_config_for_hf lays it out; fields() reads it back."""
  args = dict(img_size=list(cfg.img_size), patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
              depths=list(cfg.depths), num_heads=list(cfg.num_heads), window_size=cfg.window_size,
              mlp_ratio=cfg.mlp_ratio)
  if _is_locat(cfg):
    args.update(gaug=cfg.gaug, prr=cfg.prr)
  return dict(architecture=architecture(cfg), num_classes=cfg.num_classes, num_features=cfg.feature_dim,
              global_pool='avg', model_args=args,
              pretrained_cfg=vit_layout.pretrained_cfg(cfg, classifier='head.fc'))


def _architecture_fields(name: str) -> dict:
  """What a model name fixes: window, and PRR (the authors' locatswin_* always run it, timm's never)."""
  try:
    cfg = swin.model_config(name)
  except ValueError:  # no name, or another timm Swin: the tensors and model_args tell
    return {}
  return dict(window_size=cfg.window_size, prr=cfg.prr)


def fields(state: dict[str, np.ndarray], hf: dict) -> dict[str, Any]:
  """SwinConfig fields from the tensors, then the architecture's name, then config.json's keys (top
  level, as the parity folders put them, then model_args)."""
  out = {**_tensor_fields(_params_only(state)), **_architecture_fields(_architecture(hf))}
  if 'input_size' in hf.get('pretrained_cfg', {}):
    out['img_size'] = hf['pretrained_cfg']['input_size'][1:]
  args = {**hf, **hf.get('model_args', {})}
  out.update({key: args[key] for key in _ARGS if key in args})
  return out


def _tensor_fields(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """Every size field but the window (tables shrink with the built grid, so they do not tell it)."""
  if 'patch_embed.proj.weight' not in state or _TELLTALE not in state:
    raise ValueError(f'not a Swin state dict: no patch_embed.proj.weight or {_TELLTALE} among '
                     f'{sorted(state)[:8]}{"..." if len(state) > 8 else ""}')
  embed_dim, _, patch, _ = state['patch_embed.proj.weight'].shape
  blocks = [tuple(map(int, m.groups())) for k in state if (m := re.match(r'layers\.(\d+)\.blocks\.(\d+)\.', k))]
  num_stages = 1 + max(i for i, _ in blocks)
  # The highest index, not the count, so that a block missing in the middle is reported as missing.
  depths = [1 + max((j for i, j in blocks if i == s), default=-1) for s in range(num_stages)]
  heads = [state[f'layers.{s}.blocks.0.attn.relative_position_bias_table'].shape[1]
           if f'layers.{s}.blocks.0.attn.relative_position_bias_table' in state else 0 for s in range(num_stages)]
  head = state.get('head.fc.weight')
  return dict(embed_dim=embed_dim, patch_size=patch, depths=depths, num_heads=heads,
              mlp_ratio=state['layers.0.blocks.0.mlp.fc1.weight'].shape[0] / embed_dim,
              num_classes=0 if head is None else head.shape[0],
              gaug='layers.0.blocks.0.attn.gaug.log_var.weight' in state, drop_path=0.0)


def config(fields: dict[str, Any], state: dict[str, np.ndarray]) -> swin.SwinConfig:
  del state
  return swin.SwinConfig.from_dict(fields)
