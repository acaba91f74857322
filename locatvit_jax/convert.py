"""The authors' timm layout <-> ours: a key map of templates plus per-tensor transforms.

    python -m locatvit_jax.convert SRC DST            # official .safetensors/.pth/HF dir -> Orbax params
    python -m locatvit_jax.convert SRC DST --to-timm  # ours (any load()-able path) -> timm .safetensors

Each rule pairs a timm key template with our '/'-joined param path and a transform. `{i}` stands for a
block index. Transforms are exact (transposes), so timm -> ours -> timm is bit-identical.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

import jax
import numpy as np

from locatvit_jax import checkpoint, loading, paths

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


def to_orbax(src: str, dst: str) -> None:
  """Writes the params export of any load()-able checkpoint."""
  model = loading.load(src)
  checkpoint.save_params(dst, loading.get_params(model), model.cfg)


def to_timm(src: str, dst: str) -> None:
  """Writes a timm-layout .safetensors that the authors' code loads with load_state_dict."""
  from safetensors.numpy import save
  model = loading.load(src)
  params = loading.flatten(jax.tree.map(np.asarray, loading.get_params(model)))
  state = ours_to_timm(params, gap=model.cfg.pool == 'gap')
  paths.write_bytes(dst, save({k: np.ascontiguousarray(v) for k, v in state.items()}))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m locatvit_jax.convert', description=__doc__.split('\n\n')[0])
  parser.add_argument('src', help='official .safetensors/.pth, HF-style dir, or our Orbax checkpoint')
  parser.add_argument('dst', help='Orbax params directory (default) or .safetensors file (--to-timm)')
  parser.add_argument('--to-timm', action='store_true', help='write a timm-layout .safetensors instead')
  args = parser.parse_args(argv)
  try:
    # Checked before loading the source, which takes a while: the suffix tells the format meant.
    if args.to_timm and not args.dst.endswith('.safetensors'):
      raise ValueError(f'{args.dst}: --to-timm writes a .safetensors file; give a DST ending in .safetensors')
    if not args.to_timm and args.dst.endswith('.safetensors'):
      raise ValueError(f'{args.dst}: writing .safetensors needs --to-timm; '
                       'without it DST is an Orbax directory')
    (to_timm if args.to_timm else to_orbax)(args.src, args.dst)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.dst}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
