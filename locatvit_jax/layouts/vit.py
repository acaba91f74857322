"""The authors' (and timm's) ViT layout <-> ours: LocAtViT and plain ViT, any pooling, registers, no-pos.

config.json is timm's hub format (hf_config): it states everything the tensors cannot: heads, PRR,
image size, pooling, and the evaluation transform.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from locatvit_jax.configs import common
from locatvit_jax.layouts import rules
from locatvit_jax.models import vit

FAMILY = vit.FAMILY

# Our paths address ViT's nnx.Param tree. The patch embedding and the blocks' rows are shared by the
# ViT-like families (RoPE-Mixed, Jumbo: layouts/rope.py, layouts/jumbo.py).
PATCH_EMBED_RULES = [
    ('patch_embed.proj.weight', 'patch_embed/kernel', 'conv'),
    ('patch_embed.proj.bias', 'patch_embed/bias', 'none'),
]
BLOCK_RULES = [
    ('blocks.{i}.norm1.weight', 'blocks/{i}/norm1/scale', 'none'),
    ('blocks.{i}.norm1.bias', 'blocks/{i}/norm1/bias', 'none'),
    ('blocks.{i}.attn.qkv.weight', 'blocks/{i}/attn/qkv/kernel', 'linear'),
    ('blocks.{i}.attn.qkv.bias', 'blocks/{i}/attn/qkv/bias', 'none'),
    ('blocks.{i}.attn.proj.weight', 'blocks/{i}/attn/proj/kernel', 'linear'),
    ('blocks.{i}.attn.proj.bias', 'blocks/{i}/attn/proj/bias', 'none'),
    ('blocks.{i}.attn.gaug.log_var.weight', 'blocks/{i}/attn/gaug/var_proj/kernel', 'linear'),
    ('blocks.{i}.attn.gaug.log_var.bias', 'blocks/{i}/attn/gaug/var_proj/bias', 'none'),
    ('blocks.{i}.attn.gaug.log_alpha.weight', 'blocks/{i}/attn/gaug/alpha_proj/kernel', 'linear'),
    ('blocks.{i}.attn.gaug.log_alpha.bias', 'blocks/{i}/attn/gaug/alpha_proj/bias', 'none'),
    ('blocks.{i}.norm2.weight', 'blocks/{i}/norm2/scale', 'none'),
    ('blocks.{i}.norm2.bias', 'blocks/{i}/norm2/bias', 'none'),
    ('blocks.{i}.mlp.fc1.weight', 'blocks/{i}/mlp/fc1/kernel', 'linear'),
    ('blocks.{i}.mlp.fc1.bias', 'blocks/{i}/mlp/fc1/bias', 'none'),
    ('blocks.{i}.mlp.fc2.weight', 'blocks/{i}/mlp/fc2/kernel', 'linear'),
    ('blocks.{i}.mlp.fc2.bias', 'blocks/{i}/mlp/fc2/bias', 'none'),
]
TABLE = rules.RuleTable(PATCH_EMBED_RULES + [
    ('cls_token', 'cls_token', 'none'),
    ('reg_token', 'reg_token', 'none'),
    ('pos_embed', 'pos_embed', 'none'),
] + BLOCK_RULES + [
    ('norm.weight', 'norm/scale', 'none'),  # class-token pooling
    ('norm.bias', 'norm/bias', 'none'),
    ('fc_norm.weight', 'norm/scale', 'none'),  # GAP pooling: timm norms after pooling
    ('fc_norm.bias', 'norm/bias', 'none'),
    ('head.weight', 'head/kernel', 'linear'),
    ('head.bias', 'head/bias', 'none'),
])

def _pooling_has(gap: bool):
  """timm names the final norm `norm` with class-token pooling and `fc_norm` with GAP; ours is `norm`."""
  return lambda key: not (key.startswith('norm.') and gap or key.startswith('fc_norm.') and not gap)


def to_ours(state: dict[str, np.ndarray], cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
  gap = cfg.pool == 'gap'
  return TABLE.to_ours(state, _pooling_has(gap), f' with {"GAP" if gap else "class-token"} pooling')


def to_timm(flat: dict[str, np.ndarray], cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
  return TABLE.to_timm(flat, _pooling_has(cfg.pool == 'gap'))


def claims(state: dict, hf: dict) -> bool:
  """The fallback family: any state dict no other layout claims is read as a ViT's (and fails there)."""
  del state, hf
  return True


# -- config.json: timm's hub format -------------------------------------------------------------------
# timm's pooling names; ours: 'token' pools the class token, 'gap' averages the patch tokens.
TIMM_POOLS = {'token': 'token', 'gap': 'avg'}
_OUR_POOLS = {timm: ours for ours, timm in TIMM_POOLS.items()}
# Keys of model_args (the kwargs of timm's VisionTransformer and the authors' LocAtViT) that are ViTConfig
# fields under another name. mlp_ratio, global_pool, no_pos_emb and pos_embed need more.
_RENAMED_ARGS = {'img_size': 'img_size', 'patch_size': 'patch_size', 'embed_dim': 'width', 'depth': 'depth',
                 'num_heads': 'num_heads', 'class_token': 'class_token', 'reg_tokens': 'reg_tokens', 'gaug': 'gaug',
                 'prr': 'prr', 'num_classes': 'num_classes'}
_SIZE_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')
_NAMED_FIELDS = _SIZE_FIELDS + ('gaug', 'prr')  # what a model name fixes


def _is_locat(cfg: vit.ViTConfig) -> bool:
  # GAug, PRR or both: the authors build all three with their LocAtViT class, plain ViT with timm's.
  return cfg.gaug or cfg.prr


def architecture(cfg: vit.ViTConfig) -> str:
  """The registered name of cfg's constructor in the authors' spelling, at cfg's size where they register it.

  Other sizes get the family's first name (tiny): model_args carry the real sizes, which timm passes to
  that constructor, as `timm.create_model('locatvit_tiny', embed_dim=32, ...)` would.
  """
  # The authors build a plain ViT without position embedding with their own class (nopos_vit_*).
  nopos_class = not _is_locat(cfg) and cfg.pos_embed == 'none'
  names = [alias for alias, ours in vit.MODEL_ALIASES.items()
           if ours.startswith('locatvit_') == _is_locat(cfg) and (alias in vit.ALIAS_FIELDS) == nopos_class]
  size = lambda c: tuple(getattr(c, f) for f in _SIZE_FIELDS)
  return next((alias for alias in names if size(vit.model_config(alias)) == size(cfg)), names[0])


def _model_args(cfg: vit.ViTConfig) -> dict:
  """Every architecture field as the constructor's kwargs, so that none depends on the name's defaults."""
  args = dict(img_size=list(cfg.img_size), patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, class_token=cfg.class_token,
              global_pool=TIMM_POOLS[cfg.pool], reg_tokens=cfg.reg_tokens)
  if _is_locat(cfg):  # LocAtViT sets timm's pos_embed itself, from its own no_pos_emb
    return dict(args, gaug=cfg.gaug, prr=cfg.prr, no_pos_emb=cfg.pos_embed == 'none')
  if cfg.pos_embed == 'none':  # nopos_vit_* sets it itself and takes no pos_embed
    return args
  return dict(args, pos_embed=cfg.pos_embed)


def pretrained_cfg(cfg, first_conv: str = 'patch_embed.proj', classifier: str = 'head') -> dict:
  """timm's data config: the classification recipe's evaluation transform (transforms.eval_transform).
  Shared by every family's hf_config."""
  t = common.eval_transform(cfg.FAMILY)
  return dict(input_size=[3, *cfg.img_size], interpolation='bicubic', crop_mode='center',
              # timm resizes the short side to floor(size / crop_pct): 248 for 224, as aug.eval_resize.
              crop_pct=t['img_size'] / t['eval_resize'], mean=list(t['mean']), std=list(t['std']),
              num_classes=cfg.num_classes, first_conv=first_conv, classifier=classifier)


def hf_config(cfg: vit.ViTConfig) -> dict:
  """config.json as timm's save_config_for_hf lays it out; fields() reads it back."""
  return dict(architecture=architecture(cfg), num_classes=cfg.num_classes, num_features=cfg.width,
              global_pool=TIMM_POOLS[cfg.pool], model_args=_model_args(cfg), pretrained_cfg=pretrained_cfg(cfg))


def _architecture_fields(name) -> dict:
  try:
    cfg = vit.model_config(name)
  except ValueError:  # no name, or another timm ViT (vit_small_patch16_384, ...): the tensors tell
    return {}
  return {f: getattr(cfg, f) for f in _NAMED_FIELDS + tuple(vit.ALIAS_FIELDS.get(name, ()))}


def config_json_fields(fields: dict, hf: dict) -> dict:
  """`fields` (ViTConfig fields) updated with what config.json `hf` states, later sources winning: its
  architecture's name, pretrained_cfg's input_size, top-level keys (timm's num_classes and global_pool;
  the authors' parity file puts img_size, num_heads, reg_tokens there), then model_args.
  """
  fields = {**fields, **_architecture_fields(str(hf.get('architecture', '')))}
  if 'input_size' in hf.get('pretrained_cfg', {}):
    fields['img_size'] = hf['pretrained_cfg']['input_size'][1:]
  args = {**hf, **hf.get('model_args', {})}
  fields.update({ours: args[key] for key, ours in _RENAMED_ARGS.items() if key in args})
  if 'mlp_ratio' in args:
    fields['mlp_dim'] = round(args['mlp_ratio'] * fields['width'])
  if 'global_pool' in args:
    fields['pool'] = _OUR_POOLS.get(args['global_pool'], args['global_pool'])  # ViTConfig rejects the others
  if 'no_pos_emb' in args:
    fields['pos_embed'] = 'none' if args['no_pos_emb'] else 'learn'
  if 'pos_embed' in args:
    fields['pos_embed'] = args['pos_embed']
    if args['pos_embed'] == 'none' and (fields.get('class_token') or fields.get('reg_tokens')):
      raise ValueError("config.json builds timm's VisionTransformer with pos_embed='none', which never prepends its "
                       'class and register tokens (timm 1.0.19); this port does not reproduce that. The authors '
                       "avoid it: their nopos_vit_* and LocAtViT's no_pos_emb=True prepend them and add nothing")
  return fields


def fields(state: dict[str, np.ndarray], hf: dict) -> dict[str, Any]:
  """ViTConfig fields from the tensors, then what config.json states."""
  return config_json_fields(_tensor_fields(state), hf)


def _tensor_fields(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """The ViTConfig fields the tensors tell; without GAug, heads are a guess a config.json corrects."""
  for key in ('patch_embed.proj.weight', 'blocks.0.mlp.fc1.weight'):
    if key not in state:
      raise ValueError(f'not a ViT state dict: no {key} among '
                       f'{sorted(state)[:8]}{"..." if len(state) > 8 else ""}')
  width, _, patch, _ = state['patch_embed.proj.weight'].shape
  # The highest index, not the count, so that a block missing in the middle is reported as missing.
  depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r'blocks\.(\d+)\.', k)))
  gaug = 'blocks.0.attn.gaug.log_var.weight' in state
  if gaug:
    heads = width // state['blocks.0.attn.gaug.log_var.weight'].shape[1]
  else:
    heads = next((s[2] for s in vit.SIZES.values() if s[0] == width), width // 64)
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=state['blocks.0.mlp.fc1.weight'].shape[0],
              patch_size=patch, num_classes=state['head.weight'].shape[0] if 'head.weight' in state else 0,
              gaug=gaug, pool='gap' if 'fc_norm.weight' in state else 'token',
              class_token='cls_token' in state,  # timm's GAP models may keep one: it attends, unpooled
              pos_embed='learn' if 'pos_embed' in state else 'none',
              reg_tokens=state['reg_token'].shape[1] if 'reg_token' in state else 0, drop_path=0.0)


def config(fields: dict[str, Any], state: dict[str, np.ndarray]) -> vit.ViTConfig:
  """The config; a square image size from the position embedding where nothing stated one."""
  if 'img_size' not in fields and 'pos_embed' in state:
    fields = dict(fields, img_size=_square_image_size(state['pos_embed'], fields))
  return vit.ViTConfig.from_dict(fields)


def _square_image_size(pos_embed: np.ndarray, fields: dict) -> int:
  n = pos_embed.shape[1] - int(fields['class_token']) - fields['reg_tokens']
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'pos_embed has {n} patch positions, not a square grid; give the image size it was '
                     'built for: load(path, img_size=(height, width))')
  return side * fields['patch_size']
