"""The authors' Jumbo layout (their models/jumbo.py on timm's VisionTransformer) <-> ours.

PyTorch's state dict lists the shared class-token MLP under the model (`jumbo_mlp.*`) and again under
every block (`blocks.{i}.jumbo_mlp.*`): one module, registered depth + 1 times. Ours holds it once.
Reading checks that every copy is the same tensor (else the checkpoint is not one shared MLP) and keeps
one; writing gives every key its copy again, so timm -> ours -> timm is bit-identical.

config.json is timm's hub format; the authors' Jumbo takes `locat` (GAug, PRR and norm_patches at once)
and `J` where ours has gaug, prr and num_class_tokens.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from locatvit_jax.layouts import rules
from locatvit_jax.layouts import vit as vit_layout
from locatvit_jax.models import jumbo

FAMILY = jumbo.FAMILY

SHARED_MLP = ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias')  # under jumbo_mlp. and blocks.{i}.jumbo_mlp.
_BLOCK_COPY = re.compile(r'^blocks\.(\d+)\.jumbo_mlp\.(.+)$')

TABLE = rules.RuleTable(vit_layout.PATCH_EMBED_RULES + vit_layout.BLOCK_RULES + [
    ('cls_token', 'cls_token', 'none'),
    ('pos_embed', 'pos_embed', 'none'),
    ('jumbo_mlp.fc1.weight', 'jumbo_mlp/fc1/kernel', 'linear'),
    ('jumbo_mlp.fc1.bias', 'jumbo_mlp/fc1/bias', 'none'),
    ('jumbo_mlp.fc2.weight', 'jumbo_mlp/fc2/kernel', 'linear'),
    ('jumbo_mlp.fc2.bias', 'jumbo_mlp/fc2/bias', 'none'),
    ('blocks.{i}.ls1.gamma', 'blocks/{i}/ls1/gamma', 'none'),
    ('blocks.{i}.ls2.gamma', 'blocks/{i}/ls2/gamma', 'none'),
    ('blocks.{i}.norm3.weight', 'blocks/{i}/norm3/scale', 'none'),
    ('blocks.{i}.norm3.bias', 'blocks/{i}/norm3/bias', 'none'),
    ('blocks.{i}.ls3.gamma', 'blocks/{i}/ls3/gamma', 'none'),
    ('norm.weight', 'norm/scale', 'none'),  # over the concatenated class tokens
    ('norm.bias', 'norm/bias', 'none'),
    ('norm_patches.weight', 'norm_patches/scale', 'none'),  # LocAt only
    ('norm_patches.bias', 'norm_patches/bias', 'none'),
    ('head.weight', 'head/kernel', 'linear'),
    ('head.bias', 'head/bias', 'none'),
])


def shared_mlp_once(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The state dict with the shared MLP under `jumbo_mlp.*` only, after checking that every block's copy
  is bit-identical to it (a state dict without the top-level copy takes block 0's)."""
  copies: dict[str, list[tuple[str, np.ndarray]]] = {}
  rest = {}
  for key, tensor in state.items():
    m = _BLOCK_COPY.match(key)
    if m:
      copies.setdefault(m.group(2), []).append((key, tensor))
    else:
      rest[key] = tensor
  for name, listed in copies.items():
    top = f'jumbo_mlp.{name}'
    first_key, first = (top, rest[top]) if top in rest else listed[0]
    for key, tensor in listed:
      if np.shape(tensor) != np.shape(first) or not np.array_equal(np.asarray(tensor), np.asarray(first)):
        raise ValueError(f'{key} differs from {first_key}: the Jumbo MLP is one module shared by every block, '
                         'so all its copies in the state dict must be equal')
    rest[top] = first
  return rest


def to_ours(state: dict[str, np.ndarray], cfg: jumbo.JumboConfig) -> dict[str, np.ndarray]:
  return TABLE.to_ours(shared_mlp_once(state))


def to_timm(flat: dict[str, np.ndarray], cfg: jumbo.JumboConfig) -> dict[str, np.ndarray]:
  """The authors' state dict: the shared MLP under the model and under every block, as PyTorch lists it."""
  state = TABLE.to_timm(flat)
  for name in SHARED_MLP:
    if f'jumbo_mlp.{name}' in state:
      state.update({f'blocks.{i}.jumbo_mlp.{name}': state[f'jumbo_mlp.{name}'] for i in range(cfg.depth)})
  return state


def claims(state: dict, hf: dict) -> bool:
  """By config.json's architecture, else by the shared MLP's tensors (no other family has them)."""
  arch = str(hf.get('architecture', ''))
  if arch in jumbo.MODEL_NAMES or arch in jumbo.MODEL_ALIASES:
    return True
  return 'jumbo_mlp.fc1.weight' in state or 'blocks.0.jumbo_mlp.fc1.weight' in state


# -- config.json: timm's hub format -------------------------------------------------------------------
# Keys of model_args (the kwargs of the authors' Jumbo and timm's VisionTransformer) that are JumboConfig
# fields under another name. mlp_ratio and locat need more.
_RENAMED_ARGS = {'img_size': 'img_size', 'patch_size': 'patch_size', 'embed_dim': 'width', 'depth': 'depth',
                 'num_heads': 'num_heads', 'num_classes': 'num_classes', 'J': 'num_class_tokens',
                 'jumbo_mlp_ratio': 'jumbo_mlp_ratio', 'init_values': 'init_values', 'gaug': 'gaug', 'prr': 'prr'}
_SIZE_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')
_NAMED_FIELDS = _SIZE_FIELDS + ('gaug', 'prr')  # what a model name fixes


def architecture(cfg: jumbo.JumboConfig) -> str:
  """The authors' registered name: locatjumbo_* with GAug or PRR, at cfg's size where they register it,
  else the tiny name (model_args carry the real sizes)."""
  kind = 'locatjumbo' if cfg.gaug or cfg.prr else 'jumbo'
  names = [n for n in jumbo.MODEL_NAMES if n.split('_')[0] == kind]
  size = lambda c: tuple(getattr(c, f) for f in _SIZE_FIELDS)
  return next((n for n in names if size(jumbo.model_config(n)) == size(cfg)), names[0])


def _model_args(cfg: jumbo.JumboConfig) -> dict:
  """Every architecture field as the authors' constructor's kwargs. Their `locat` switches GAug and PRR
  together; a config with one of them only (our ablations) states both as gaug/prr, which their code
  cannot build."""
  args = dict(img_size=list(cfg.img_size), patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, J=cfg.num_class_tokens,
              jumbo_mlp_ratio=cfg.jumbo_mlp_ratio, init_values=cfg.init_values, no_embed_class=True)
  if cfg.gaug == cfg.prr:
    return dict(args, locat=cfg.gaug)
  return dict(args, gaug=cfg.gaug, prr=cfg.prr)


def hf_config(cfg: jumbo.JumboConfig) -> dict:
  """config.json as timm's save_config_for_hf lays it out; fields() reads it back."""
  return dict(architecture=architecture(cfg), num_classes=cfg.num_classes, num_features=cfg.width,
              global_pool='token', model_args=_model_args(cfg), pretrained_cfg=vit_layout.pretrained_cfg(cfg))


def _architecture_fields(name: str) -> dict:
  try:
    cfg = jumbo.model_config(name)
  except ValueError:  # no name: the tensors tell
    return {}
  return {f: getattr(cfg, f) for f in _NAMED_FIELDS}


def fields(state: dict[str, np.ndarray], hf: dict) -> dict[str, Any]:
  """JumboConfig fields; later sources win: the architecture's name, the tensors' sizes (its GAug from the
  name, so that a named LocAt checkpoint without GAug tensors is reported as incomplete), pretrained_cfg's
  input_size, top-level keys (the parity files put kwargs there), then model_args. PRR only from
  config.json: it has no parameters."""
  told = _tensor_fields(state)
  out = {**told, **_architecture_fields(str(hf.get('architecture', '')))}
  out.update({k: v for k, v in told.items() if k != 'gaug'})
  if 'num_heads' not in out:  # without GAug the tensors do not tell; a guess a config.json corrects
    out['num_heads'] = next((s[2] for s in jumbo.SIZES.values() if s[0] == out['width']), out['width'] // 64)
  if 'input_size' in hf.get('pretrained_cfg', {}):
    out['img_size'] = hf['pretrained_cfg']['input_size'][1:]
  args = {**hf, **hf.get('model_args', {})}
  if 'locat' in args:
    out.update(gaug=bool(args['locat']), prr=bool(args['locat']))
  out.update({ours: args[key] for key, ours in _RENAMED_ARGS.items() if key in args})
  if 'mlp_ratio' in args:
    out['mlp_dim'] = round(args['mlp_ratio'] * out['width'])
  return out


def _tensor_fields(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """The fields the tensors tell (heads only through GAug's input width)."""
  for key in ('patch_embed.proj.weight', 'cls_token', 'blocks.0.mlp.fc1.weight', 'jumbo_mlp.fc1.weight'):
    if key not in state and not (key == 'jumbo_mlp.fc1.weight' and 'blocks.0.jumbo_mlp.fc1.weight' in state):
      raise ValueError(f'not a Jumbo state dict: no {key} among '
                       f'{sorted(state)[:8]}{"..." if len(state) > 8 else ""}')
  width, _, patch, _ = state['patch_embed.proj.weight'].shape
  j = state['cls_token'].shape[1]
  depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r'blocks\.(\d+)\.', k)))
  jumbo_fc1 = state.get('jumbo_mlp.fc1.weight', state.get('blocks.0.jumbo_mlp.fc1.weight'))
  out = dict(width=width, depth=depth, mlp_dim=state['blocks.0.mlp.fc1.weight'].shape[0], patch_size=patch,
             num_class_tokens=j, jumbo_mlp_ratio=jumbo_fc1.shape[0] / (j * width),
             num_classes=state['head.weight'].shape[0] if 'head.weight' in state else 0,
             gaug='blocks.0.attn.gaug.log_var.weight' in state, drop_path=0.0)
  if out['gaug']:
    out['num_heads'] = width // state['blocks.0.attn.gaug.log_var.weight'].shape[1]
  return out


def config(fields: dict[str, Any], state: dict[str, np.ndarray]) -> jumbo.JumboConfig:
  """The config; a square image size from the position embedding (patch rows only) where nothing stated one."""
  if 'img_size' not in fields and 'pos_embed' in state:
    no_prefix = dict(fields, class_token=False, reg_tokens=0)
    fields = dict(fields, img_size=vit_layout._square_image_size(state['pos_embed'], no_prefix))
  return jumbo.JumboConfig.from_dict(fields)
