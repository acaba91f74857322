"""Frozen features of a classification dataset, kept on the mesh, for k-NN and linear probes.

A FeatureSet holds one row per image as `(chunks, chunk, C)` arrays sharded over the mesh's batch
axes on the middle axis: chunk i is the i-th evaluation batch, and each device keeps its share of
every batch. Extraction therefore moves nothing between devices. Rows padded to fill the last batches
have valid 0; k-NN's memory bank (retrieval.py) keeps the valid rows only.

Evaluator configs describe their data with the fields of DATA_DEFAULTS (`cfg.data`): a source as
in data/sources.py (kind 'folder': root/<split>/<class>/<image>; kind 'tfds': name, data_dir), and
the evaluation transform (resize the short side to eval_resize, centre-crop img_size, normalise).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from locatvit_jax import sharding
from locatvit_jax.data import pipeline, sources

_AUG = pipeline.default_aug_config()
# The defaults are the paper's evaluation transform (224 px and the recipe's eval_resize, mean, std).
DATA_DEFAULTS = dict(kind='folder', root=None, name=None, data_dir=None, train_split='train', eval_split=None,
                     num_classes=None, img_size=224, eval_resize=_AUG.eval_resize, mean=tuple(_AUG.mean),
                     std=tuple(_AUG.std), worker_count=8)

ROWS = P(None, sharding.BATCH_AXES)  # (chunks, chunk, ...): rows of each chunk over the batch axes


def check_fields(prefix: str, cfg, allowed) -> None:
  """One ValueError naming the first field of `cfg` that is not in `allowed`."""
  unknown = sorted(set(cfg) - set(allowed))
  if unknown:
    raise ValueError(f'{prefix}.{unknown[0]} is not a field of this evaluator; expected fields among '
                     f'{sorted(allowed)}')


def data_config(prefix: str, cfg) -> ml_collections.ConfigDict:
  """cfg.data with defaults filled in, checked (prefix: e.g. 'config.evals.knn')."""
  data = cfg.get('data')
  if data is None or not hasattr(data, 'items'):
    raise ValueError(f'{prefix}.data is missing; expected a ConfigDict with kind and root (folder: '
                     'root/<split>/<class>/<image>) or name (tfds)')
  check_fields(f'{prefix}.data', data, DATA_DEFAULTS)
  out = ml_collections.ConfigDict(DATA_DEFAULTS)
  out.update({k: v for k, v in data.items() if v is not None})
  if out.kind not in sources.SOURCE_KINDS:
    raise ValueError(f'{prefix}.data.kind={out.kind!r}; expected one of {sources.SOURCE_KINDS}')
  if out.kind == 'tfds' and not out.name:
    raise ValueError(f"{prefix}.data.name is empty; expected a TFDS dataset name with kind='tfds'")
  for field in ('img_size', 'eval_resize'):
    if not isinstance(out[field], int) or out[field] < 1:
      raise ValueError(f'{prefix}.data.{field}={out[field]!r}; expected a positive number of pixels')
  if out.eval_resize < out.img_size:
    raise ValueError(f'{prefix}.data.eval_resize={out.eval_resize} is smaller than img_size={out.img_size}; '
                     'expected the short side resized to at least the centre crop')
  return out


def open_split(prefix: str, data, split: str):
  """The classification source of `split`; errors name the evaluator that asked."""
  try:
    return sources.classification_source(data, split)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f'{prefix}.data: {e}') from e


def check_batch_size(prefix: str, batch_size, mesh) -> None:
  dp = sharding.batch_parallelism(mesh)
  if (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or batch_size % dp
      or batch_size % jax.process_count()):
    raise ValueError(f'{prefix}.batch_size={batch_size!r}; expected a positive multiple of the data-parallel '
                     f'size {dp} and of the {jax.process_count()} processes')


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FeatureSet:
  """Rows of (chunks, chunk, ...) arrays sharded as ROWS (module docstring)."""
  features: jax.Array  # (chunks, chunk, C) float32
  labels: jax.Array  # (chunks, chunk) int32
  valid: jax.Array  # (chunks, chunk) bool

  @property
  def num_valid(self) -> int:
    return int(jax.device_get(_count(self.valid)))


@jax.jit
def _count(valid):
  return jnp.sum(valid.astype(jnp.int32))


def from_numpy(features, labels, mesh, chunk: int) -> FeatureSet:
  """A FeatureSet of in-memory rows (N, C), padded to whole chunks of `chunk` rows (tests, notebooks)."""
  features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
  n = len(features)
  chunks = -(-n // chunk)
  pad = chunks * chunk - n
  valid = np.arange(chunks * chunk) < n
  put = lambda x: jax.device_put(x.reshape((chunks, chunk) + x.shape[1:]), NamedSharding(mesh, ROWS))
  return FeatureSet(put(np.pad(features, ((0, pad), (0, 0)))), put(np.pad(labels, (0, pad))), put(valid))


@functools.partial(jax.jit, static_argnums=0)
def _pooled(graphdef, state, images):
  # stop_gradient: evaluators read frozen features; nothing may ever differentiate into the model.
  model = nnx.merge(graphdef, state)
  return jax.lax.stop_gradient(model.pooled_features(images)).astype(jnp.float32)


def extract(model, source, data, batch_size: int, mesh, seed: int = 0) -> FeatureSet:
  """model.pooled_features of every image of `source` under the evaluation transform, in file order.

  `model` is in eval mode, its arrays placed on `mesh` (replicated or sharded). Every process runs
  this; each loads its share of the images (pipeline.classification_loader).
  """
  aug = pipeline.default_aug_config()
  aug.update(dict(mean=tuple(data.mean), std=tuple(data.std), eval_resize=data.eval_resize))
  loader = pipeline.classification_loader(source, train=False, global_batch_size=batch_size, img_size=data.img_size,
                                          aug=aug, seed=seed, worker_count=data.worker_count)
  graphdef, state = nnx.split(model)
  feats, labels, valid = [], [], []
  for batch in loader:
    batch.pop('skipped')  # corrupt images are masked out through 'valid'
    batch = sharding.to_global(batch, mesh)
    feats.append(_pooled(graphdef, state, batch['image']))
    labels.append(batch['label'])
    valid.append(batch['valid'].astype(bool))
  # Stacking along a new leading axis keeps each device's rows where they are (sharded as ROWS).
  stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=NamedSharding(mesh, ROWS))
  return FeatureSet(stack(*feats), stack(*labels), stack(*valid))
