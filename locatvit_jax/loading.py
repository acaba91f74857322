"""`load(path)`: a ready model from any checkpoint we or the authors write; params in and out.

Accepted paths:
* our params export: a directory with `params/` (Orbax) and `model_config.json`;
* our training checkpoints: a workdir, its `checkpoints/` directory, or one step directory of it;
* the authors' timm-layout state dict as `.safetensors`, or `.pth`/`.pt`/`.bin` (needs torch);
* the authors' training checkpoints, `*.pth.tar` as timm's CheckpointSaver writes them (needs torch,
  and trust_pickle=True when they hold train.py's arguments); `ema=True` takes their EMA weights;
* a Hugging Face-style directory: `config.json` + `model.safetensors` (or `pytorch_model.bin`).

Every family loads alike (ViT, Swin, RoPE-Mixed ViT, Jumbo: models/registry.py). Architecture comes
from our `model_config.json`, or is inferred from the tensors (family by their names; width, depth,
patch, registers, classes, image size, GAug) and `config.json` (heads, PRR, image size, pooling, in
timm's hub format, and the authors' or timm's model names: each family's layouts/ module reads and
writes it), or a training checkpoint's arguments (model name, pooling, classes, model kwargs). PRR has
no parameters: where none of these says it, `prr=` must.
"""

from __future__ import annotations

import argparse
import io
import dataclasses
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from locatvit_jax import checkpoint, paths
from locatvit_jax import layouts
from locatvit_jax.models import registry

_TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.pth.tar')  # .pth.tar: timm's CheckpointSaver
# Where training checkpoints keep their weights, by `ema`: timm's CheckpointSaver's keys, then DeiT's.
_WEIGHTS_KEYS = {False: ('state_dict', 'model'), True: ('state_dict_ema', 'model_ema')}
# Key prefixes of wrapped models (DistributedDataParallel, torch.compile), dropped as timm's clean_state_dict does.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
# How torch.load(weights_only=True) names a global it will not unpickle (torch < 2.4: 'Unsupported class').
_REFUSED_GLOBAL = re.compile(r'Unsupported (?:global: GLOBAL|class) ([\w.]+)')
# The keys of the record that segmentation runs keep in place of a ViT config (segmentation.head_config).
_SEGMENTATION_RECORD = {'init', 'backbone', 'num_classes', 'hidden'}


# -- params as plain dicts ---------------------------------------------------------------------
def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f'{prefix}/{k}' if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, path))
    else:
      out[path] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def params_dict(params: nnx.State) -> dict:
  """An nnx.State of parameters as a plain nested dict of arrays with string keys (the export layout)."""
  return unflatten(flatten(nnx.to_pure_dict(params)))


def get_params(model) -> dict:
  """The model's parameters in the export layout."""
  return params_dict(nnx.state(model, nnx.Param))


def build_model(cfg: registry.ModelConfig, params: dict | None = None, *, seed: int = 0):
  """A model of `cfg`, with `params` (nested or '/'-flat dict) checked and put in place of the init.

  Every missing, unexpected or wrongly shaped tensor is reported in one ValueError.
  """
  if params is None:
    return registry.build(cfg, rngs=nnx.Rngs(seed))
  graphdef, abs_params, _ = nnx.split(nnx.eval_shape(lambda: registry.build(cfg, rngs=nnx.Rngs(seed))),
                                     nnx.Param, ...)
  given = flatten(params) if any(isinstance(v, dict) for v in params.values()) else dict(params)
  _check_shapes(flatten(nnx.to_pure_dict(abs_params)), given, cfg)
  # Non-parameter state (dropout RNG keys) is made under jit, where the unused param init is dropped.
  rest = jax.jit(lambda: nnx.split(registry.build(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)[2])()
  pure = nnx.to_pure_dict(abs_params)
  filled = _fill(pure, given, '')
  nnx.replace_by_pure_dict(abs_params, filled)
  return nnx.merge(graphdef, abs_params, rest)


def _check_shapes(expected: dict[str, Any], given: dict[str, Any], cfg: registry.ModelConfig) -> None:
  """One ValueError naming every missing, unexpected and wrongly shaped tensor (flat dicts)."""
  shape = lambda v: tuple(np.shape(v))
  problems = [f'missing {k} {shape(v)}' for k, v in expected.items() if k not in given]
  problems += [f'unexpected {k} {shape(v)}' for k, v in given.items() if k not in expected]
  problems += [f'wrong shape {k}: got {shape(given[k])}, expected {shape(v)}'
               for k, v in expected.items() if k in given and shape(given[k]) != shape(v)]
  if problems:
    raise ValueError(f'checkpoint does not fit {_describe(cfg)}: ' + '; '.join(problems))


def _fill(pure, given, prefix):
  return {k: (_fill(v, given, f'{prefix}/{k}' if prefix else str(k)) if isinstance(v, dict)
              else jax.numpy.asarray(given[f'{prefix}/{k}' if prefix else str(k)], dtype=v.dtype))
          for k, v in pure.items()}


# How a config is named in errors: the fields that fix the tensors, in timm's short names where they differ.
_DESCRIBED = {'num_heads': 'heads', 'patch_size': 'patch', 'num_classes': 'classes'}
_NOT_DESCRIBED = ('prr', 'img_size', 'mlp_dim', 'pos_embed', 'drop_path', 'dtype', 'gaug_impl', 'remat')


def _describe(cfg: registry.ModelConfig) -> str:
  said = [f'{_DESCRIBED.get(k, k)}={v}' for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_DESCRIBED]
  return ('' if cfg.FAMILY == registry.DEFAULT_FAMILY else f'{cfg.FAMILY} ') + ' '.join(said)


# -- reading the authors' files ------------------------------------------------------------------
def read_checkpoint(path, *, ema: bool = False, trust_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """(timm state dict, what the file says of the model in config.json's terms) from .safetensors (no torch
  needed) or .pth/.pt/.bin/.pth.tar (needs torch), local or gs://.

  `ema` takes a training checkpoint's EMA weights. `trust_pickle` lets torch unpickle Python objects besides
  tensors (timm's training checkpoints hold train.py's argparse.Namespace), which can run code from the file.
  """
  path = paths.path(path)
  kind = '.pth.tar' if path.name.endswith('.pth.tar') else path.suffix  # its suffix alone is '.tar'
  if kind == '.safetensors':
    if ema:
      raise _no_ema(path)
    from safetensors import SafetensorError
    from safetensors.numpy import load
    try:
      return load(paths.read_bytes(path)), {}
    except SafetensorError as e:
      raise ValueError(f'{path}: not a readable .safetensors file ({e})') from e
  if kind in _TORCH_SUFFIXES:
    return _read_torch(path, ema, trust_pickle)
  raise ValueError(f'{path}: unknown checkpoint file type; expected .safetensors, .pth, .pt, .bin or .pth.tar')


def _read_torch(path, ema: bool, trust_pickle: bool) -> tuple[dict[str, np.ndarray], dict]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f'reading {path} needs PyTorch, which is not installed: `pip install torch`, or convert it '
        'to .safetensors where torch is available (safetensors.torch.save_file(sd, "model.safetensors"))'
    ) from e
  try:
    ckpt = torch.load(io.BytesIO(paths.read_bytes(path)), map_location='cpu', weights_only=not trust_pickle)
  # Its error types vary with the cause (zip, pickle, unsafe globals) and the torch version.
  except Exception as e:  # pylint: disable=broad-except
    refused = None if trust_pickle else _REFUSED_GLOBAL.search(str(e))
    if refused:
      raise ValueError(f'{path}: pickles {refused[1]} besides tensors (timm training checkpoints keep their '
                       'argparse arguments so), and unpickling it can run code from the file; if you trust the '
                       'file, allow it: load(path, trust_pickle=True) or --trust-pickle') from e
    raise ValueError(f'{path}: not a PyTorch checkpoint that torch.load reads ({checkpoint.first_line(e)})') from e
  sd = _weights(path, ckpt, ema)
  if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
    raise ValueError(f'{path}: holds a {type(sd).__name__} that is not a state dict; expected tensors by name, at '
                     "the top or under 'state_dict' or 'model' ('state_dict_ema' or 'model_ema' with ema=True)")
  return ({_unwrapped(k): v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()},
          _training_args(ckpt))


def _weights(path, ckpt, ema: bool):
  """A training checkpoint's state dict of the chosen weights, else the file's own content."""
  if isinstance(ckpt, dict):
    key = next((k for k in _WEIGHTS_KEYS[ema] if isinstance(ckpt.get(k), dict)), None)
    if key:
      return ckpt[key]
  if ema:
    raise _no_ema(path)
  return ckpt


def _no_ema(path) -> ValueError:
  return ValueError(f"{path}: holds no EMA weights; ema=True reads a PyTorch training checkpoint's "
                    "'state_dict_ema' (timm) or 'model_ema'")


def _unwrapped(key: str) -> str:
  for prefix in _WRAPPER_PREFIXES:
    key = key.removeprefix(prefix)
  return key


def _training_args(ckpt) -> dict:
  """What timm's train.py arguments (CheckpointSaver's 'args') say of the model, in config.json's terms: its
  name, pooling, classes and constructor kwargs. Not img_size: train.py gives it to the data, not the model."""
  args = ckpt.get('args') if isinstance(ckpt, dict) else None
  if not isinstance(args, argparse.Namespace):
    return {}
  kwargs = getattr(args, 'model_kwargs', None)
  said = dict(architecture=getattr(args, 'model', None), global_pool=getattr(args, 'gp', None),
              num_classes=getattr(args, 'num_classes', None), model_args=kwargs if isinstance(kwargs, dict) else None)
  return {k: v for k, v in said.items() if v is not None}


def infer_config(state: dict[str, np.ndarray], hf: dict | None = None, source: str = 'the state dict',
                 prr_if_unstated: bool | None = None, **overrides):
  """Family and architecture from timm tensor names and shapes, then what a config.json (`hf`) states, then
  explicit overrides.

  A config.json that contradicts the tensors gives a config they do not fit, which _check_shapes reports.
  PRR has no parameters, so only `hf` or `overrides` tell it, else `prr_if_unstated`: else a ValueError
  naming `source`.
  """
  layout = layouts.for_checkpoint(state, hf or {})
  fields = {**layout.fields(state, hf or {}), **overrides}
  if 'prr' not in fields and prr_if_unstated is not None:
    fields['prr'] = prr_if_unstated
  if 'prr' not in fields:  # a GAug model may or may not use PRR: the paper ablates both
    raise ValueError(
        f'{source} does not say whether the model uses PRR, which the tensors cannot tell (it has no parameters); '
        'state it: load(path, prr=True) or --prr=true (false: no PRR), convert it once (locatvit-convert SRC DIR '
        '--prr=true), or load a folder whose config.json names a locat* architecture or model_args.prr')
  return layout.config(fields, state)


def _timm_model(state, hf, source, overrides, prr_if_unstated):
  cfg = infer_config(state, hf, source, prr_if_unstated, **overrides)
  layout = layouts.for_config(cfg)
  # Checked in the file's own names and layouts, so that errors name the tensors the user has.
  # Zero-stride views give the expected timm shapes without allocating any parameter.
  abstract = flatten(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: registry.build(cfg, rngs=nnx.Rngs(0))),
                                                nnx.Param)))
  views = {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) for k, v in abstract.items()}
  _check_shapes(layout.to_timm(views, cfg), state, cfg)
  return build_model(cfg, layout.to_ours(state, cfg))


# -- the public entry ------------------------------------------------------------------------------
def load_with_config(path, *, ema: bool = False, trust_pickle: bool = False, prr_if_unstated: bool | None = None,
                     **overrides):
  path = paths.path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such file or directory')
  if not path.is_dir():
    state, said = read_checkpoint(path, ema=ema, trust_pickle=trust_pickle)
    return _timm_model(state, said, f'{path} (no config.json)', overrides, prr_if_unstated)
  if checkpoint.holds_model(path):
    record, record_file = checkpoint.read_model_record(path)
    if _SEGMENTATION_RECORD <= record.keys():
      raise ValueError(f'{path} is a segmentation run (a head on a frozen backbone), not a classification '
                       f'model; its backbone is config.init={record["init"]}, and '
                       'locatvit_jax.train.segmentation.load_export(WORKDIR/export) loads backbone and head')
    try:  # the record alone first: an error in `overrides` is not the file's
      registry.config_from_dict(record)
    except (TypeError, ValueError) as e:
      raise ValueError(f'{record_file}: {e}') from e
    if ema:  # our trainers keep no EMA
      raise _no_ema(path)
    return build_model(registry.config_from_dict({**record, **overrides}), checkpoint.restore_params(path))
  hf_path = path / 'config.json'
  for weights in ('model.safetensors', 'pytorch_model.bin'):
    if (path / weights).exists():
      has_config = hf_path.exists()
      hf = checkpoint.read_json(hf_path) if has_config else {}
      state, _ = read_checkpoint(path / weights, ema=ema, trust_pickle=trust_pickle)
      return _timm_model(state, hf, hf_path if has_config else f'{path} (no config.json)', overrides,
                         prr_if_unstated)
  raise ValueError(f'{path}: found neither params/ + model_config.json, training checkpoints, '
                   'nor config.json + model.safetensors')


def load(path, *, ema: bool = False, trust_pickle: bool = False, prr_if_unstated: bool | None = None,
         **overrides):
  """A model in evaluation mode from any supported checkpoint (module docstring).

  `overrides` set config fields the files cannot tell (e.g. `prr=False`, `dtype='bfloat16'`); a state
  dict without config.json needs `prr`, or `prr_if_unstated`, which only applies where the files do not
  say (a trainer's config states its architecture). `ema=True` takes a training checkpoint's EMA weights.
  `trust_pickle=True` lets torch unpickle a .pth(.tar) that holds Python objects besides tensors (timm's
  training checkpoints do), which can run code from the file: give it only for files you trust.
  A path that is no such model (damaged, incomplete, a segmentation run) is one ValueError naming the
  file and what is wrong; a missing path is FileNotFoundError, a torch file without torch ImportError.
  """
  model = load_with_config(path, ema=ema, trust_pickle=trust_pickle, prr_if_unstated=prr_if_unstated, **overrides)
  model.eval()
  return model


# -- the command lines' load flags (convert, predict) --------------------------------------------------
def add_load_flags(parser: argparse.ArgumentParser) -> None:
  """Flags for what load() cannot read from the files: PRR, EMA and trust."""
  parser.add_argument('--prr', choices=('true', 'false'),
                      help='whether the model uses PRR, for a state dict without config.json: PRR has no '
                      "parameters, so the tensors cannot tell (the authors' LocAtViT: true)")
  parser.add_argument('--ema', action='store_true',
                      help="the EMA weights of a training checkpoint (timm's state_dict_ema)")
  parser.add_argument('--trust-pickle', action='store_true',
                      help='let torch unpickle a .pth/.pth.tar that holds Python objects besides tensors, as timm '
                      'training checkpoints (*.pth.tar) do; unpickling can run code: only for files you trust')


def load_flags(args: argparse.Namespace) -> dict:
  """load()'s keyword arguments from the flags of add_load_flags."""
  stated = {} if args.prr is None else {'prr': args.prr == 'true'}
  return dict(stated, ema=args.ema, trust_pickle=args.trust_pickle)
