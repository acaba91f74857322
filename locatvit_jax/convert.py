"""The authors' timm layout <-> ours: a key map of templates plus per-tensor transforms, and config.json.

    python -m locatvit_jax.convert SRC DST            # official .safetensors/.pth(.tar)/HF dir -> Orbax params
    python -m locatvit_jax.convert SRC DST --to-timm  # any load()-able SRC -> timm .safetensors
    python -m locatvit_jax.convert SRC DIR --to-hf    # any load()-able SRC -> DIR/config.json + model.safetensors

What SRC cannot tell, the flags state: `--prr=true|false` for a state dict without config.json (PRR has
no parameters), `--ema` for a training checkpoint's EMA weights, and `--trust-pickle` to unpickle the
authors' training checkpoints (*.pth.tar: they pickle their argparse arguments, which can run code).

A SRC that cannot be loaded (missing, damaged, not a model) or a DST of the wrong kind is one
`error: ...` line and exit status 2, and nothing is written: SRC is read whole before DST is touched.

Each rule pairs a timm key template with our '/'-joined param path and a transform. `{i}` stands for a
block index. Transforms are exact (transposes), so timm -> ours -> timm is bit-identical.

The Hugging Face folder is what timm's push_to_hf_hub writes and the authors publish (hf-hub:sinahmr/...):
model.safetensors in the timm layout, and a config.json in timm's hub format (hf_config), which states
everything the tensors cannot: heads, PRR, image size, pooling, and the evaluation transform.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Callable

import jax
import numpy as np

from locatvit_jax import checkpoint, loading, paths
from locatvit_jax.configs import common
from locatvit_jax.models import vit

# (timm key, our path, transform name). Our paths address ViT's nnx.Param tree.
RULES = [
    ('patch_embed.proj.weight', 'patch_embed/kernel', 'conv'),
    ('patch_embed.proj.bias', 'patch_embed/bias', 'none'),
    ('cls_token', 'cls_token', 'none'),
    ('reg_token', 'reg_token', 'none'),
    ('pos_embed', 'pos_embed', 'none'),
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
    ('norm.weight', 'norm/scale', 'none'),  # class-token pooling
    ('norm.bias', 'norm/bias', 'none'),
    ('fc_norm.weight', 'norm/scale', 'none'),  # GAP pooling: timm norms after pooling
    ('fc_norm.bias', 'norm/bias', 'none'),
    ('head.weight', 'head/kernel', 'linear'),
    ('head.bias', 'head/bias', 'none'),
]

# name: (timm -> ours, ours -> timm)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    'none': (lambda t: t, lambda t: t),
    'linear': (lambda t: t.T, lambda t: t.T),  # (out, in) <-> (in, out)
    'conv': (lambda t: t.transpose(2, 3, 1, 0), lambda t: t.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
}


def _regex(template: str) -> re.Pattern:
  return re.compile('^' + re.escape(template).replace(re.escape('{i}'), r'(?P<i>\d+)') + '$')


_TIMM_RES = [(_regex(t), o, tr) for t, o, tr in RULES]
_OURS_RES = [(_regex(o), t, tr) for t, o, tr in RULES]


def _pooling_has(timm_key: str, gap: bool) -> bool:
  """timm names the final norm `norm` with class-token pooling and `fc_norm` with GAP; ours is `norm`."""
  return not (timm_key.startswith('norm.') and gap or timm_key.startswith('fc_norm.') and not gap)


def timm_to_ours(state: dict[str, np.ndarray], gap: bool = False) -> dict[str, np.ndarray]:
  """Flat timm state dict -> flat {our/path: array}."""
  out = {}
  for key, tensor in state.items():
    for pattern, ours, tr in _TIMM_RES:
      m = pattern.match(key)
      if m and _pooling_has(key, gap):
        out[ours.format(**m.groupdict())] = TRANSFORMS[tr][0](np.asarray(tensor))
        break
    else:
      raise ValueError(f'no rule for timm key {key!r} with {"GAP" if gap else "class-token"} pooling')
  return out


def ours_to_timm(flat: dict[str, np.ndarray], gap: bool = False) -> dict[str, np.ndarray]:
  """Flat {our/path: array} -> timm state dict. Transposes are views: safetensors needs them contiguous."""
  out = {}
  for path, tensor in flat.items():
    for pattern, timm_key, tr in _OURS_RES:
      m = pattern.match(path)
      if m and _pooling_has(timm_key, gap):
        out[timm_key.format(**m.groupdict())] = TRANSFORMS[tr][1](np.asarray(tensor))
        break
    else:
      raise ValueError(f'no timm name for our parameter {path!r}')
  return out


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
  family = [alias for alias, ours in vit.MODEL_ALIASES.items() if ours.startswith('locatvit_') == _is_locat(cfg)]
  size = lambda c: tuple(getattr(c, f) for f in _SIZE_FIELDS)
  return next((alias for alias in family if size(vit.model_config(alias)) == size(cfg)), family[0])


def _model_args(cfg: vit.ViTConfig) -> dict:
  """Every architecture field as the constructor's kwargs, so that none depends on the name's defaults."""
  args = dict(img_size=list(cfg.img_size), patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, class_token=cfg.class_token,
              global_pool=TIMM_POOLS[cfg.pool], reg_tokens=cfg.reg_tokens)
  if _is_locat(cfg):  # LocAtViT sets timm's pos_embed itself, from its own no_pos_emb
    return dict(args, gaug=cfg.gaug, prr=cfg.prr, no_pos_emb=cfg.pos_embed == 'none')
  return dict(args, pos_embed=cfg.pos_embed)


def _pretrained_cfg(cfg: vit.ViTConfig) -> dict:
  """timm's data config: the classification recipe's evaluation transform (transforms.eval_transform)."""
  t = common.eval_transform()
  return dict(input_size=[3, *cfg.img_size], interpolation='bicubic', crop_mode='center',
              # timm resizes the short side to floor(size / crop_pct): 248 for 224, as aug.eval_resize.
              crop_pct=t['img_size'] / t['eval_resize'], mean=list(t['mean']), std=list(t['std']),
              num_classes=cfg.num_classes,
              first_conv='patch_embed.proj', classifier='head')


def hf_config(cfg: vit.ViTConfig) -> dict:
  """config.json as timm's save_config_for_hf lays it out; config_json_fields reads it back."""
  return dict(architecture=architecture(cfg), num_classes=cfg.num_classes, num_features=cfg.width,
              global_pool=TIMM_POOLS[cfg.pool], model_args=_model_args(cfg), pretrained_cfg=_pretrained_cfg(cfg))


def _architecture_fields(name) -> dict:
  try:
    cfg = vit.model_config(name)
  except ValueError:  # no name, or another timm ViT (vit_small_patch16_384, ...): the tensors tell
    return {}
  return {f: getattr(cfg, f) for f in _NAMED_FIELDS}


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
  return fields


# -- writers ---------------------------------------------------------------------------------------------
# `load_args`: loading.load's keyword arguments (loading.load_flags).
def to_orbax(src: str, dst: str, **load_args) -> None:
  """Writes the params export of any load()-able checkpoint."""
  model = loading.load(src, **load_args)
  checkpoint.save_params(dst, loading.get_params(model), model.cfg)


def _timm_safetensors(model: vit.ViT) -> bytes:
  from safetensors.numpy import save
  params = loading.flatten(jax.tree.map(np.asarray, loading.get_params(model)))
  state = ours_to_timm(params, gap=model.cfg.pool == 'gap')
  return save({k: np.ascontiguousarray(v) for k, v in state.items()})


def to_timm(src: str, dst: str, **load_args) -> None:
  """Writes a timm-layout .safetensors that the authors' code loads with load_state_dict."""
  paths.write_bytes(dst, _timm_safetensors(loading.load(src, **load_args)))


def write_hf(model: vit.ViT, dst) -> None:
  """DST/model.safetensors (timm layout) + DST/config.json (hf_config): a folder load() rebuilds `model` from."""
  dst = paths.path(dst)
  paths.write_bytes(dst / 'model.safetensors', _timm_safetensors(model))
  paths.write_text(dst / 'config.json', json.dumps(hf_config(model.cfg), indent=2) + '\n')


def to_hf(src: str, dst: str, **load_args) -> None:
  """Writes the Hugging Face-style folder of any load()-able checkpoint."""
  write_hf(loading.load(src, **load_args), dst)


WRITERS = {'orbax': to_orbax, 'timm': to_timm, 'hf': to_hf}


def check_destination(dst: str, kind: str) -> None:
  """ValueError when DST cannot hold what `kind` writes: checked before the source, which loads slowly."""
  if kind == 'timm':
    if not dst.endswith('.safetensors'):
      raise ValueError(f'{dst}: --to-timm writes a .safetensors file; give a DST ending in .safetensors')
    return
  if dst.endswith('.safetensors'):
    if kind == 'hf':
      raise ValueError(f'{dst}: --to-hf writes a folder (config.json + model.safetensors); give a DST directory')
    raise ValueError(f'{dst}: writing .safetensors needs --to-timm; without it DST is an Orbax directory')
  if paths.path(dst).exists() and not paths.path(dst).is_dir():
    writer = '--to-hf' if kind == 'hf' else 'the Orbax export (no --to-timm)'
    raise ValueError(f'{dst}: is a file, and {writer} writes a directory; give a new or directory DST')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m locatvit_jax.convert', description=__doc__.split('\n\n')[0])
  parser.add_argument('src', help='official .safetensors/.pth/.pth.tar, HF-style dir, or our Orbax checkpoint')
  parser.add_argument('dst', help='Orbax params directory (default), .safetensors file (--to-timm) '
                      'or Hugging Face-style directory (--to-hf)')
  to = parser.add_mutually_exclusive_group()
  to.add_argument('--to-timm', action='store_const', dest='kind', const='timm', default='orbax',
                  help='write a timm-layout .safetensors instead')
  to.add_argument('--to-hf', action='store_const', dest='kind', const='hf',
                  help='write DST/config.json + DST/model.safetensors (timm layout) instead')
  loading.add_load_flags(parser)
  args = parser.parse_args(argv)
  try:
    check_destination(args.dst, args.kind)
    WRITERS[args.kind](args.src, args.dst, **loading.load_flags(args))
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2  # bad input, as for locatvit_jax.main, predict and argparse's usage errors
  print(f'wrote {args.dst}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
