"""`load(path)`: a ready model from any checkpoint we or the authors write; params in and out.

Accepted paths:
* our params export: a directory with `params/` (Orbax) and `model_config.json`;
* our training checkpoints: a workdir, its `checkpoints/` directory, or one step directory of it;
* the authors' timm-layout state dict as `.safetensors`, or `.pth`/`.pt`/`.bin` (needs torch);
* a Hugging Face-style directory: `config.json` + `model.safetensors` (or `pytorch_model.bin`).

Architecture comes from our `model_config.json`, or is inferred from the tensors (width, depth,
patch, registers, classes, image size, GAug) and `config.json` (heads, PRR, image size, pooling: see
convert.hf_config for the keys, in timm's hub format, and the authors' or timm's model names).
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from locatvit_jax import checkpoint, paths
from locatvit_jax.models.vit import SIZES, ViT, ViTConfig

_TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
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


def get_params(model: ViT) -> dict:
  """The model's parameters in the export layout."""
  return params_dict(nnx.state(model, nnx.Param))


def build_model(cfg: ViTConfig, params: dict | None = None, *, seed: int = 0) -> ViT:
  """A model of `cfg`, with `params` (nested or '/'-flat dict) checked and put in place of the init.

  Every missing, unexpected or wrongly shaped tensor is reported in one ValueError.
  """
  if params is None:
    return ViT(cfg, rngs=nnx.Rngs(seed))
  graphdef, abs_params, _ = nnx.split(nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(seed))), nnx.Param, ...)
  given = flatten(params) if any(isinstance(v, dict) for v in params.values()) else dict(params)
  _check_shapes(flatten(nnx.to_pure_dict(abs_params)), given, cfg)
  # Non-parameter state (dropout RNG keys) is made under jit, where the unused param init is dropped.
  rest = jax.jit(lambda: nnx.split(ViT(cfg, rngs=nnx.Rngs(seed)), nnx.Param, ...)[2])()
  pure = nnx.to_pure_dict(abs_params)
  filled = _fill(pure, given, '')
  nnx.replace_by_pure_dict(abs_params, filled)
  return nnx.merge(graphdef, abs_params, rest)


def _check_shapes(expected: dict[str, Any], given: dict[str, Any], cfg: ViTConfig) -> None:
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


def _describe(cfg: ViTConfig) -> str:
  return (f'width={cfg.width} depth={cfg.depth} heads={cfg.num_heads} patch={cfg.patch_size} '
          f'classes={cfg.num_classes} gaug={cfg.gaug} pool={cfg.pool} class_token={cfg.class_token} '
          f'reg_tokens={cfg.reg_tokens}')


# -- reading the authors' files ------------------------------------------------------------------
def read_state_dict(path) -> dict[str, np.ndarray]:
  """A timm state dict from .safetensors (no torch needed) or .pth/.pt/.bin (needs torch), local or gs://."""
  path = paths.path(path)
  if path.suffix == '.safetensors':
    from safetensors import SafetensorError
    from safetensors.numpy import load
    try:
      return load(paths.read_bytes(path))
    except SafetensorError as e:
      raise ValueError(f'{path}: not a readable .safetensors file ({e})') from e
  if path.suffix in _TORCH_SUFFIXES:
    try:
      import torch
    except ImportError as e:
      raise ImportError(
          f'reading {path} needs PyTorch, which is not installed: `pip install torch`, or convert it '
          'to .safetensors where torch is available (safetensors.torch.save_file(sd, "model.safetensors"))'
      ) from e
    try:
      sd = torch.load(io.BytesIO(paths.read_bytes(path)), map_location='cpu', weights_only=True)
    # Its error types vary with the cause (zip, pickle, unsafe globals) and the torch version.
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path}: not a PyTorch checkpoint that torch.load reads ({checkpoint.first_line(e)})') from e
    for key in ('model', 'state_dict', 'model_ema'):  # training checkpoints wrap the state dict
      if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
        sd = sd[key]
        break
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
      raise ValueError(f'{path}: holds a {type(sd).__name__} that is not a state dict; expected tensors by name, '
                       "at the top or under 'model', 'state_dict' or 'model_ema'")
    return {k.removeprefix('module.'): v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in sd.items()}
  raise ValueError(f'{path}: unknown checkpoint file type; expected .safetensors, .pth, .pt or .bin')


def infer_config(state: dict[str, np.ndarray], hf: dict | None = None, **overrides) -> ViTConfig:
  """Architecture from timm tensor shapes, then what a config.json (`hf`) states, then explicit overrides.

  A config.json that contradicts the tensors gives a config they do not fit, which _check_shapes reports.
  """
  from locatvit_jax import convert  # see _timm_model

  fields = convert.config_json_fields(_tensor_fields(state), hf or {})
  fields.update(overrides)
  if 'img_size' not in fields and 'pos_embed' in state:
    fields['img_size'] = _square_image_size(state['pos_embed'], fields)
  return ViTConfig.from_dict(fields)


def _tensor_fields(state: dict[str, np.ndarray]) -> dict[str, Any]:
  """The ViTConfig fields the tensors tell; heads and PRR are guesses a config.json corrects."""
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
    heads = next((s[2] for s in SIZES.values() if s[0] == width), width // 64)
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=state['blocks.0.mlp.fc1.weight'].shape[0],
              patch_size=patch, num_classes=state['head.weight'].shape[0] if 'head.weight' in state else 0,
              gaug=gaug, prr=gaug, pool='gap' if 'fc_norm.weight' in state else 'token',
              class_token='cls_token' in state,  # timm's GAP models may keep one: it attends, unpooled
              pos_embed='learn' if 'pos_embed' in state else 'none',
              reg_tokens=state['reg_token'].shape[1] if 'reg_token' in state else 0, drop_path=0.0)


def _square_image_size(pos_embed: np.ndarray, fields: dict) -> int:
  n = pos_embed.shape[1] - int(fields['class_token']) - fields['reg_tokens']
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'pos_embed has {n} patch positions, not a square grid; give the image size it was '
                     'built for: load(path, img_size=(height, width))')
  return side * fields['patch_size']


def _timm_model(state, hf, overrides) -> ViT:
  # Imported here: were it imported with the package, `python -m locatvit_jax.convert` would warn
  # that the module it runs is already imported.
  from locatvit_jax import convert

  cfg = infer_config(state, hf, **overrides)
  gap = cfg.pool == 'gap'
  # Checked in the file's own names and layouts, so that errors name the tensors the user has.
  # Zero-stride views give the expected timm shapes without allocating any parameter.
  abstract = flatten(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0))), nnx.Param)))
  views = {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) for k, v in abstract.items()}
  _check_shapes(convert.ours_to_timm(views, gap=gap), state, cfg)
  return build_model(cfg, convert.timm_to_ours(state, gap=gap))


# -- the public entry ------------------------------------------------------------------------------
def load_with_config(path, **overrides) -> ViT:
  path = paths.path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such file or directory')
  if not path.is_dir():
    return _timm_model(read_state_dict(path), None, overrides)
  if checkpoint.holds_model(path):
    record, record_file = checkpoint.read_model_record(path)
    if _SEGMENTATION_RECORD <= record.keys():
      raise ValueError(f'{path} is a segmentation run (a head on a frozen backbone), not a classification '
                       f'model; its backbone is config.init={record["init"]}, and '
                       'locatvit_jax.train.segmentation.load_export(WORKDIR/export) loads backbone and head')
    try:  # the record alone first: an error in `overrides` is not the file's
      ViTConfig.from_dict(record)
    except (TypeError, ValueError) as e:
      raise ValueError(f'{record_file}: {e}') from e
    return build_model(ViTConfig.from_dict({**record, **overrides}), checkpoint.restore_params(path))
  hf_path = path / 'config.json'
  for weights in ('model.safetensors', 'pytorch_model.bin'):
    if (path / weights).exists():
      hf = checkpoint.read_json(hf_path) if hf_path.exists() else {}
      return _timm_model(read_state_dict(path / weights), hf, overrides)
  raise ValueError(f'{path}: found neither params/ + model_config.json, training checkpoints, '
                   'nor config.json + model.safetensors')


def load(path, **overrides) -> ViT:
  """A model in evaluation mode from any supported checkpoint (module docstring).

  `overrides` set ViTConfig fields the files cannot tell (e.g. `prr=False`, `dtype='bfloat16'`).
  A path that is no such model (damaged, incomplete, a segmentation run) is one ValueError naming the
  file and what is wrong; a missing path is FileNotFoundError, a torch file without torch ImportError.
  """
  model = load_with_config(path, **overrides)
  model.eval()
  return model
