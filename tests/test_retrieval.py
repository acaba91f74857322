"""The shared streaming top-k (evaluators/retrieval.py) against NumPy brute force, on meshes of 8, 2x2x2
and 1 devices (results equal across them); padding never wins; approx_max_k; its benchmark."""

import jax
import ml_collections
import numpy as np
import pytest

from locatvit_jax import sharding
from locatvit_jax.evaluators import retrieval

K = 7
MESHES = [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(data=1)]


def mesh_of(**axes):
  return sharding.make_mesh(ml_collections.ConfigDict(axes), jax.devices()[:int(np.prod(list(axes.values())))])


def unit_rows(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def numpy_search(queries, memory, k=K):
  """Brute force in float64: scores and ids of the k best rows, ties to the lower id."""
  sims = queries.astype(np.float64) @ memory.astype(np.float64).T
  ids = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(sims, ids, 1), ids


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  memory = unit_rows(rng.standard_normal((203, 16)))
  # Two payloads: a label distribution per row (Hummingbird) and a class per row (k-NN).
  return memory, rng.random((203, 5)).astype(np.float32), rng.integers(0, 9, 203), unit_rows(
      rng.standard_normal((37, 16)))


@pytest.fixture(scope='module')
def results(data):
  memory, dists, classes, queries = data
  out = {}
  for axes in MESHES:
    mesh = mesh_of(**axes)
    # Chunks of at most 8 rows: several streaming steps per device, the running top-k carried across them.
    bank = retrieval.make_memory_bank(memory, dists, mesh, memory_chunk=8, k=K)
    q = jax.device_put(queries, sharding.replicated(mesh))
    labels = retrieval.make_memory_bank(memory, classes, mesh, memory_chunk=8, k=K)
    out[tuple(axes.items())] = (bank, jax.device_get(retrieval.search(q, bank, k=K, mesh=mesh)),
                                jax.device_get(retrieval.search(q, labels, k=K, mesh=mesh)))
  return out


@pytest.mark.parametrize('axes', MESHES)
def test_search_equals_numpy_on_any_mesh(data, results, axes):
  memory, dists, classes, queries = data
  bank, found, found_labels = results[tuple(axes.items())]
  devices = int(np.prod(list(axes.values())))
  assert bank.size == 203 and K <= bank.chunk <= 8
  assert bank.features.shape[0] % (bank.chunk * devices) == 0 and bank.features.shape[0] - 203 < bank.chunk * devices
  want_scores, want_ids = numpy_search(queries, memory)
  np.testing.assert_array_equal(found.ids, want_ids)
  np.testing.assert_allclose(found.scores, want_scores, atol=1e-6)
  np.testing.assert_array_equal(found.payload, dists[want_ids])
  np.testing.assert_array_equal(found_labels.payload, classes[want_ids])


def test_result_does_not_depend_on_the_device_count(results):
  (_, eight, eight_labels), *others = results.values()
  for _, found, found_labels in others:
    np.testing.assert_array_equal(found.ids, eight.ids)
    np.testing.assert_array_equal(found.payload, eight.payload)  # copied rows, never partial sums
    np.testing.assert_array_equal(found_labels.payload, eight_labels.payload)
    np.testing.assert_allclose(found.scores, eight.scores, atol=1e-6)


def test_padding_rows_never_win():
  # Every entry scores below 0 against the query, the padding rows' zero features score 0: only
  # their -inf bias keeps them out. 10 entries over 8 devices, chunks of K rows: mostly padding.
  memory = -unit_rows(np.random.default_rng(1).random((10, 4)) + 0.1)
  query = unit_rows(np.ones((1, 4)))
  mesh = mesh_of(data=8)
  bank = retrieval.make_memory_bank(memory, np.arange(10), mesh, memory_chunk=2, k=K)
  found = jax.device_get(retrieval.search(jax.device_put(query, sharding.replicated(mesh)), bank, k=K, mesh=mesh))
  want_scores, want_ids = numpy_search(query, memory)
  np.testing.assert_array_equal(found.ids, want_ids)
  np.testing.assert_array_equal(found.payload, want_ids)
  assert np.all(found.scores < 0)


def test_approx_top_k_finds_the_neighbours(data):
  memory, dists, _, queries = data
  mesh = mesh_of(data=8)
  bank = retrieval.make_memory_bank(memory, dists, mesh, memory_chunk=32, k=K)
  found = retrieval.search(jax.device_put(queries, sharding.replicated(mesh)), bank, k=K, mesh=mesh,
                           approx_recall=0.9)
  _, want_ids = numpy_search(queries, memory)
  recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(np.asarray(found.ids), want_ids)])
  assert recall >= 0.9


def test_mismatched_payload_is_one_error():
  with pytest.raises(ValueError, match=r'^10 memory features but 9 payload rows; expected one per entry$'):
    retrieval.make_memory_bank(np.zeros((10, 4)), np.zeros(9), mesh_of(data=1), memory_chunk=8, k=2)


def test_retrieval_benchmark_runs_and_reports_per_entry_cost():
  from benchmarks import retrieval as bench
  out = bench.measure(2000, dim=8, labels=3, queries=16, k=5, memory_chunk=64, top_k='approx', iters=1)
  assert (out['entries'], out['devices'], out['top_k']) == (2000, 8, 'approx')
  assert out['queries_per_s'] > 0 and out['xla_temp_mb'] is not None and out['bank_mb'] > 0
  assert out['ns_per_query_entry'] == pytest.approx(1e9 / (out['queries_per_s'] * 2000), rel=0.02)
