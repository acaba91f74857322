"""The authors' timm layout <-> ours: a key map of templates plus per-tensor transforms.

    python -m locatvit_jax.convert SRC DST            # official .safetensors/.pth/HF dir -> Orbax params
    python -m locatvit_jax.convert SRC DST --to-timm  # ours (any load()-able path) -> timm .safetensors

Each rule pairs a timm key template with our '/'-joined param path and a transform. `{i}` stands for a
block index. Transforms are exact (transposes), so timm -> ours -> timm is bit-identical.
"""

from __future__ import annotations

import re
import sys
from typing import Callable

import numpy as np

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


def timm_to_ours(state: dict[str, np.ndarray], gap: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
  """Flat timm state dict -> flat {our/path: array}. Returns (converted, unmatched timm keys)."""
  out, unmatched = {}, []
  for key, tensor in state.items():
    for pattern, ours, tr in _TIMM_RES:
      m = pattern.match(key)
      if m:
        if key.startswith('norm.') and gap or key.startswith('fc_norm.') and not gap:
          unmatched.append(key)  # the norm that this pooling mode does not have
        else:
          out[ours.format(**m.groupdict())] = TRANSFORMS[tr][0](np.asarray(tensor))
        break
    else:
      unmatched.append(key)
  return out, unmatched


def ours_to_timm(flat: dict[str, np.ndarray], gap: bool = False) -> dict[str, np.ndarray]:
  """Flat {our/path: array} -> timm state dict (contiguous arrays, as safetensors needs)."""
  out = {}
  for path, tensor in flat.items():
    for pattern, timm_key, tr in _OURS_RES:
      m = pattern.match(path)
      if m and not (timm_key.startswith('norm.') and gap or timm_key.startswith('fc_norm.') and not gap):
        out[timm_key.format(**m.groupdict())] = np.ascontiguousarray(TRANSFORMS[tr][1](np.asarray(tensor)))
        break
    else:
      raise ValueError(f'no timm name for our parameter {path!r}')
  return out


def main(argv=None) -> int:
  import argparse

  from locatvit_jax import loading

  parser = argparse.ArgumentParser(prog='python -m locatvit_jax.convert', description=__doc__.split('\n\n')[0])
  parser.add_argument('src', help='official .safetensors/.pth, HF-style dir, or our Orbax checkpoint')
  parser.add_argument('dst', help='Orbax params directory (default) or .safetensors file (--to-timm)')
  parser.add_argument('--to-timm', action='store_true', help='write a timm-layout .safetensors instead')
  args = parser.parse_args(argv)
  try:
    if args.to_timm:
      loading.export_timm(args.src, args.dst)
    else:
      loading.convert_to_orbax(args.src, args.dst)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.dst}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
