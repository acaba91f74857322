"""All mesh logic: the device mesh from the config, parameter and batch shardings, global batches.

Mesh axes, as in MaxText:
* `data`   pure data parallelism (parameters replicated);
* `fsdp`   data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
* `tensor` Megatron-style model parallelism inside attention and MLP.
The batch is split over `data` x `fsdp`. Parameters follow RULES: the first rule whose regex matches
the parameter path gives a PartitionSpec; an axis that does not divide its dimension is dropped, so
every model fits every mesh.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# The last rule's pattern: a parameter it matches was forgotten by the rules above.
UNMATCHED = r'.*'
# (path regex, spec). Kernels are (in, out); qkv and fc1 split their outputs over `tensor`,
# proj and fc2 their inputs, so each block needs one all-reduce per branch.
RULES = [
    (r'.*attn/qkv/kernel$', P('fsdp', 'tensor')),
    (r'.*attn/qkv/bias$', P('tensor')),
    (r'.*attn/proj/kernel$', P('tensor', 'fsdp')),
    (r'.*mlp/fc1/kernel$', P('fsdp', 'tensor')),
    (r'.*mlp/fc1/bias$', P('tensor')),
    (r'.*mlp/fc2/kernel$', P('tensor', 'fsdp')),
    (r'.*gaug/.*', P()),  # tiny; shared by all heads
    # DINO (train/dino.py): the head's first two layers as an MLP block; the 65536-wide last layer and
    # the centre, (1, 65536) in the train state, split their outputs over `tensor`.
    (r'.*dino_head/mlp/0/kernel$', P('fsdp', 'tensor')),
    (r'.*dino_head/mlp/0/bias$', P('tensor')),
    (r'.*dino_head/mlp/1/kernel$', P('tensor', 'fsdp')),
    (r'.*dino_head/last_layer$', P('fsdp', 'tensor')),
    (r'.*dino_head/last_layer_gain$', P(None, 'tensor')),  # (1, out_dim), with norm_last_layer=False
    (r'^center$', P(None, 'tensor')),
    (r'.*rope/freqs$', P()),  # RoPE-Mixed: (2, depth, heads, head_dim / 2), tiny
    (r'.*gamma_[12]$', P()),  # layer scale (C,), multiplies the replicated residual stream
    (r'.*/ls[123]/gamma$', P()),  # Jumbo's layer scales: (C,) and (J * C,) for the class tokens' branch
    (r'.*relative_position_bias_table$', P()),  # Swin: ((2w - 1)^2, heads) per block, tiny
    (r'.*downsample/reduction/kernel$', P(None, 'fsdp')),  # Swin's patch merging (4C, 2C), no bias
    (r'.*(kernel|embedding)$', P(None, 'fsdp')),
    (r'.*pos_embed$', P(None, None, 'fsdp')),
    (r'.*(bias|scale)$', P()),  # norms and biases: one vector each
    (r'.*(cls_token|reg_token)$', P()),  # a few vectors
    (UNMATCHED, P()),  # nothing should reach it: tests/test_sharding_optim.py lists what does
]


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Mesh of shape (data, fsdp, tensor) from a config with those fields; -1 fills the rest."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(AXES, sizes))}: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {dict(zip(AXES, sizes))} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices) or min(sizes) < 1:
    raise ValueError(f'mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices; '
                     f'{len(devices)} are available')
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit(spec: P, shape, mesh: Mesh) -> P:
  """Drops axes that do not divide their dimension (or that the array has no dimension for)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = [a if a is not None and d % mesh.shape[a] == 0 else None
            for a, d in zip(entries[:len(shape)], shape)]
  return P(*fitted)


def rule_for(path: str) -> tuple[str, P]:
  """The first rule whose pattern matches `path`."""
  return next(rule for rule in RULES if re.match(rule[0], path))


def spec_for(path: str, shape, mesh: Mesh) -> P:
  return _fit(rule_for(path)[1], shape, mesh)


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of (abstract) arrays, by the path rules above.

  Works for params and for optimizer state alike: optax states mirror the params' paths, so
  Adam's moments are sharded like their parameters; scalars (counts) are replicated.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, spec_for(path_key(path), np.shape(leaf), mesh)), tree)


def path_key(path) -> str:
  """'blocks/0/attn/qkv/kernel' for a pytree path, in plain dicts and nnx.State alike.

  An NNX Variable adds a trailing `.value` to its array's path; it is not part of the name.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    path = path[:-1]
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
