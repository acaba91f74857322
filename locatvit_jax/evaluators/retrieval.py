"""Nearest-neighbour search against a memory bank sharded over the mesh (k-NN and Hummingbird).

The bank's rows (feature, payload) are split over every device of the mesh, each device holding
whole chunks of `bank.chunk` rows. `search` takes a block of queries (replicated); each device
streams over its own chunks keeping a running top-k per query, the devices' k-lists are gathered
and merged once, and each winner's payload (k-NN: its class; Hummingbird: its label distribution)
is fetched from the device that holds it. No device ever holds more than (queries per call) x
bank.chunk scores; callers bound the queries per call (k-NN: one extraction batch, Hummingbird:
query_block).

Scores are float32 inner products (Precision.HIGHEST: no bfloat16 passes on TPU), as DINO's and the
reference's float32 faiss comparisons. Exact top-k by default; `approx_recall` uses
jax.lax.approx_max_k inside each chunk (the merges stay exact). The result does not depend on the
number of devices: ties go to the lower row id, and each payload row is copied, never summed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MemoryBank:
  """Rows (N_pad, ...) sharded over every mesh device; padding rows have bias -inf and never win."""
  features: jax.Array  # (N_pad, C) float32
  payload: jax.Array  # (N_pad, ...) what a search returns for each neighbour (0 in padding rows)
  bias: jax.Array  # (N_pad,) 0 for entries, -inf for padding
  ids: jax.Array  # (N_pad,) int32 global row index
  size: int = dataclasses.field(metadata=dict(static=True))  # number of entries
  chunk: int = dataclasses.field(metadata=dict(static=True))  # rows per device per streaming step


class Neighbours(NamedTuple):
  scores: jax.Array  # (Q, k) float32, descending
  ids: jax.Array  # (Q, k) int32 bank rows
  payload: jax.Array  # (Q, k, ...) the bank's payload of those rows


def make_memory_bank(features: np.ndarray, payload: np.ndarray, mesh, *, memory_chunk: int, k: int) -> MemoryBank:
  """This process's entries, features (n, C) and payload (n, ...) -> a MemoryBank over the whole mesh.

  Every process calls (with its own entries, possibly none). Each process's block is padded to the
  same multiple of (its devices x chunk), so every device holds whole chunks: the fewest chunks of
  at most memory_chunk rows, evened out so padding stays below one row per chunk and device, and at
  least k rows, so one chunk can always supply k candidates.
  """
  features, payload = np.asarray(features, np.float32), np.asarray(payload)
  if len(features) != len(payload):
    raise ValueError(f'{len(features)} memory features but {len(payload)} payload rows; expected one per entry')
  count = len(features)
  counts = (np.asarray(multihost_utils.process_allgather(np.int32(count))).reshape(-1)
            if jax.process_count() > 1 else np.array([count]))
  local_devices = mesh.size // jax.process_count()
  per_device = max(1, -(-int(counts.max()) // local_devices))
  chunk = max(k, -(-per_device // -(-per_device // memory_chunk)))
  block = -(-int(counts.max()) // (local_devices * chunk)) * local_devices * chunk
  pad = block - count
  rows = NamedSharding(mesh, P(mesh.axis_names))
  put = lambda x: jax.make_array_from_process_local_data(rows, x)
  total = block * jax.process_count()
  return MemoryBank(
      features=put(np.pad(features, ((0, pad), (0, 0)))),
      payload=put(np.pad(payload, ((0, pad),) + ((0, 0),) * (payload.ndim - 1))),
      bias=put(np.where(np.arange(block) < count, 0.0, -np.inf).astype(np.float32)),
      ids=jax.make_array_from_callback((total,), rows, lambda index: np.arange(total, dtype=np.int32)[index]),
      size=int(counts.sum()), chunk=chunk)


def _top(scores, k: int, approx_recall):
  if approx_recall is None:
    return jax.lax.top_k(scores, k)
  return jax.lax.approx_max_k(scores, k, recall_target=approx_recall)


@functools.partial(jax.jit, static_argnames=('k', 'mesh', 'approx_recall'))
def search(queries: jax.Array, bank: MemoryBank, *, k: int, mesh, approx_recall: float | None = None) -> Neighbours:
  """The k highest-scoring bank rows (inner product) of each query (Q, C), replicated on every device.
  approx_recall=None: exact top-k; else approx_max_k's recall target within each chunk."""
  axes = mesh.axis_names

  def per_device(q, feats, bias, ids, payload):
    n_chunks = feats.shape[0] // bank.chunk
    split = lambda x: x.reshape((n_chunks, bank.chunk) + x.shape[1:])

    def step(carry, chunk):
      best, best_ids = carry
      f, b, i = chunk
      score = jnp.dot(q, f.T, precision=jax.lax.Precision.HIGHEST) + b[None, :]
      score, pos = _top(score, k, approx_recall)
      # Running entries first: on equal scores top_k keeps the earlier position, the lower id.
      cand, cand_ids = jnp.concatenate([best, score], 1), jnp.concatenate([best_ids, i[pos]], 1)
      best, pick = jax.lax.top_k(cand, k)
      return (best, jnp.take_along_axis(cand_ids, pick, 1)), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32), jnp.zeros((q.shape[0], k), jnp.int32))
    (best, best_ids), _ = jax.lax.scan(step, init, (split(feats), split(bias), split(ids)))
    # The one merge: every device's k candidates (in device order = id order), then the k best.
    best = jax.lax.all_gather(best, axes, axis=1, tiled=True)
    best_ids = jax.lax.all_gather(best_ids, axes, axis=1, tiled=True)
    best, pick = jax.lax.top_k(best, k)
    best_ids = jnp.take_along_axis(best_ids, pick, 1)
    # The device holding a winner contributes its payload row, every other device zeros: the psum is
    # an exact copy, whatever the device count.
    local = best_ids - ids[0]
    mine = (local >= 0) & (local < feats.shape[0])
    rows = payload[jnp.clip(local, 0, feats.shape[0] - 1)]  # (Q, k, ...)
    mine = mine.reshape(mine.shape + (1,) * (rows.ndim - 2))
    return best, best_ids, jax.lax.psum(jnp.where(mine, rows, jnp.zeros_like(rows)), axes)

  rows = P(axes)
  return Neighbours(*jax.shard_map(per_device, mesh=mesh, in_specs=(P(), rows, rows, rows, rows),
                                   out_specs=(P(), P(), P()), check_vma=False)(
      queries, bank.features, bank.bias, bank.ids, bank.payload))
