"""The authors' timm layout <-> ours: a key map of templates plus per-tensor transforms, and config.json.

    python -m locatvit_jax.convert SRC DST            # official .safetensors/.pth(.tar)/HF dir -> Orbax params
    python -m locatvit_jax.convert SRC DST --to-timm  # any load()-able SRC -> timm .safetensors
    python -m locatvit_jax.convert SRC DIR --to-hf    # any load()-able SRC -> DIR/config.json + model.safetensors

What SRC cannot tell, the flags state: `--prr=true|false` for a state dict without config.json (PRR has
no parameters), `--ema` for a training checkpoint's EMA weights, and `--trust-pickle` to unpickle the
authors' training checkpoints (*.pth.tar: they pickle their argparse arguments, which can run code).

A SRC that cannot be loaded (missing, damaged, not a model) or a DST of the wrong kind is one
`error: ...` line and exit status 2, and nothing is written: SRC is read whole before DST is touched.

Every family (ViT, Swin, RoPE-Mixed ViT, Jumbo) has its rule table and config.json reader/writer in
layouts/; the transforms are exact (transposes), so timm -> ours -> timm is bit-identical.

The Hugging Face folder is what timm's push_to_hf_hub writes and the authors publish (hf-hub:sinahmr/...):
model.safetensors in the timm layout, and a config.json in timm's hub format (each layout's hf_config),
which states everything the tensors cannot: heads, PRR, image size, pooling, and the evaluation transform.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from locatvit_jax import checkpoint, layouts, loading, paths

# -- writers ---------------------------------------------------------------------------------------------
# `load_args`: loading.load's keyword arguments (loading.load_flags).
def to_orbax(src: str, dst: str, **load_args) -> None:
  """Writes the params export of any load()-able checkpoint."""
  model = loading.load(src, **load_args)
  checkpoint.save_params(dst, loading.get_params(model), model.cfg)


def timm_state(model) -> dict[str, np.ndarray]:
  """The model's params as its family's timm state dict."""
  params = loading.flatten(jax.tree.map(np.asarray, loading.get_params(model)))
  return layouts.for_config(model.cfg).to_timm(params, model.cfg)


def _timm_safetensors(model) -> bytes:
  from safetensors.numpy import save
  return save(timm_state(model))


def to_timm(src: str, dst: str, **load_args) -> None:
  """Writes a timm-layout .safetensors that the authors' code loads with load_state_dict."""
  paths.write_bytes(dst, _timm_safetensors(loading.load(src, **load_args)))


def write_hf(model, dst) -> None:
  """DST/model.safetensors (timm layout) + DST/config.json (hf_config): a folder load() rebuilds `model` from."""
  dst = paths.path(dst)
  paths.write_bytes(dst / 'model.safetensors', _timm_safetensors(model))
  paths.write_text(dst / 'config.json', json.dumps(layouts.for_config(model.cfg).hf_config(model.cfg), indent=2) + '\n')


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
