"""Weighted k-NN classification on frozen features, DINO's protocol (eval_knn.py of facebookresearch/dino).

Features (model.pooled_features under the evaluation transform) are L2-normalised; a query's
neighbours are the k training images of highest cosine similarity; each votes for its label with
weight exp(similarity / temperature); the prediction is the class of largest total weight. Reported
for every k of `ks` (DINO: 10, 20, 100, 200 at temperature 0.07) as top-1 and top-5 accuracy in [0, 1]
(DINO prints percent). Top-5 only with at least 5 classes.

At scale: the normalised training features (the memory) become a retrieval.MemoryBank with the
labels as payload, each process contributing the rows it extracted, split over every device in
chunks of at most `memory_chunk` rows. Each query batch is one retrieval.search (streaming top-k,
one merge across devices): no device ever holds more than (queries of one batch) x memory_chunk
scores, and the neighbours do not depend on the number of devices.

Config (config.evals.NAME): type='knn', every, data (features.DATA_DEFAULTS: the training split is
the memory, the evaluation split the queries), ks=(10, 20, 100, 200), temperature=0.07,
batch_size=256 (global images per extraction batch, also the queries per retrieval step),
memory_chunk=4096 (memory rows per device per retrieval step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from locatvit_jax.evaluators import features, retrieval

DEFAULTS = dict(ks=(10, 20, 100, 200), temperature=0.07, batch_size=256, memory_chunk=4096)
FIELDS = ('type', 'every', 'data', *DEFAULTS)


def normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (a zero row stays zero, as torch's F.normalize leaves it)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def memory_bank(memory: features.FeatureSet, mesh, *, memory_chunk: int, k: int) -> retrieval.MemoryBank:
  """The valid rows of `memory`, L2-normalised, with their labels as payload (every process calls)."""
  spec = (P(*features.ROWS, None), features.ROWS, features.ROWS)
  feats, labels, valid = multihost_utils.global_array_to_host_local_array(
      (_normalize_rows(memory.features), memory.labels, memory.valid), mesh, spec)
  keep = np.asarray(valid).reshape(-1)  # this process's rows, padding dropped
  return retrieval.make_memory_bank(np.asarray(feats).reshape(keep.size, -1)[keep],
                                    np.asarray(labels, np.int32).reshape(-1)[keep], mesh,
                                    memory_chunk=memory_chunk, k=k)


def vote(sims: jax.Array, labels: jax.Array, num_classes: int, temperature: float) -> jax.Array:
  """(Q, num_classes) class scores: the sum of exp(similarity / T) over the neighbours of each class."""
  weights = jnp.exp(sims / temperature)  # a missing neighbour (-inf) weighs 0
  rows = jnp.broadcast_to(jnp.arange(sims.shape[0])[:, None], sims.shape)
  return jnp.zeros((sims.shape[0], num_classes), jnp.float32).at[rows, jnp.maximum(labels, 0)].add(weights)


@functools.partial(jax.jit, static_argnames=('ks', 'num_classes', 'temperature', 'mesh'))
def _score_batch(queries, i, bank, *, ks, num_classes, temperature, mesh):
  """Correct top-1 / top-5 counts of query chunk `i` for every k of `ks`."""
  targets, valid = queries.labels[i], queries.valid[i]
  found = retrieval.search(normalize(queries.features[i]), bank, k=max(ks), mesh=mesh)
  counts = {}
  for k in ks:  # top_k sorts, so the k nearest are the first k of the max(ks) nearest
    scores = vote(found.scores[:, :k], found.payload[:, :k], num_classes, temperature)
    top = jax.lax.top_k(scores, min(5, num_classes))[1]
    hit = top == targets[:, None]
    counts[f'top1_k{k}'] = jnp.sum(hit[:, 0] & valid)
    if num_classes >= 5:
      counts[f'top5_k{k}'] = jnp.sum(jnp.any(hit, axis=1) & valid)
  return counts


def classify(queries: features.FeatureSet, memory: features.FeatureSet, *, ks, num_classes: int,
             temperature: float, mesh, memory_chunk: int = DEFAULTS['memory_chunk']) -> dict[str, float]:
  """Top-1 (and top-5) accuracy of the weighted k-NN vote for each k; memory rows are normalised here."""
  bank = memory_bank(memory, mesh, memory_chunk=memory_chunk, k=max(ks))
  totals = {}
  for i in range(queries.features.shape[0]):  # one query batch (= one extraction chunk) at a time
    counts = _score_batch(queries, i, bank, ks=tuple(ks),
                          num_classes=num_classes, temperature=float(temperature), mesh=mesh)
    for name, c in jax.device_get(counts).items():
      totals[name] = totals.get(name, 0) + int(c)
  n = max(queries.num_valid, 1)
  return {name: c / n for name, c in totals.items()}


@jax.jit
def _normalize_rows(x):
  return normalize(x)


class Evaluator:
  """k-NN top-1/top-5 of model.pooled_features (module docstring)."""

  def __init__(self, name: str, cfg, mesh):
    prefix = f'config.evals.{name}'
    features.check_fields(prefix, cfg, FIELDS)
    self.name, self.every, self.mesh = name, cfg.get('every', 0), mesh
    self.data = features.data_config(prefix, cfg)
    opts = {k: cfg.get(k, v) for k, v in DEFAULTS.items()}
    ks = opts['ks']
    if (not isinstance(ks, (tuple, list)) or not ks
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)):
      raise ValueError(f'{prefix}.ks={ks!r}; expected a non-empty tuple of integers >= 1 (DINO: 10, 20, 100, 200)')
    if not isinstance(opts['temperature'], (int, float)) or opts['temperature'] <= 0:
      raise ValueError(f'{prefix}.temperature={opts["temperature"]!r}; expected a positive number (DINO: 0.07)')
    features.check_batch_size(prefix, opts['batch_size'], mesh)
    chunk = opts['memory_chunk']
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
      raise ValueError(f'{prefix}.memory_chunk={chunk!r}; expected a positive number of memory rows per device')
    self.ks, self.temperature, self.batch_size = tuple(sorted(set(ks))), float(opts['temperature']), opts['batch_size']
    self.memory_chunk = chunk
    # Both splits are opened now, so missing data fails before any training or extraction.
    self.train_source = features.open_split(prefix, self.data, self.data.train_split)
    self.eval_source = features.open_split(prefix, self.data, features.sources.eval_split(self.data))
    if max(self.ks) > len(self.train_source):
      raise ValueError(f'{prefix}.ks={ks!r}: k={max(self.ks)} exceeds the {len(self.train_source)} training '
                       f'images of {self.train_source!r}; expected k <= the memory size')
    self.num_classes = self.train_source.num_classes

  def run(self, model) -> dict:
    memory = features.extract(model, self.train_source, self.data, self.batch_size, self.mesh)
    queries = features.extract(model, self.eval_source, self.data, self.batch_size, self.mesh)
    out = classify(queries, memory, ks=self.ks, num_classes=self.num_classes, temperature=self.temperature,
                   mesh=self.mesh, memory_chunk=self.memory_chunk)
    return {**out, 'memory_size': float(memory.num_valid), 'queries': float(queries.num_valid)}

