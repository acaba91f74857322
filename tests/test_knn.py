"""k-NN (DINO protocol) against a NumPy implementation written from the protocol; 8 devices == 1."""

import jax
import ml_collections
import numpy as np
import pytest

from locatvit_jax import sharding
from locatvit_jax.evaluators import features, knn, make_evaluator, retrieval

KS = (10, 20, 100, 200)
T = 0.07
NUM_CLASSES = 7


def numpy_knn(train, train_labels, test, test_labels, k, temperature, num_classes):
  """Top-1 and top-5 accuracy: full cosine-similarity matrix, k best, exp(sim/T) votes per class."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sim = unit(test).astype(np.float64) @ unit(train).astype(np.float64).T
  nearest = np.argsort(-sim, axis=1)[:, :k]
  top1 = top5 = 0
  for q in range(len(test)):
    scores = np.zeros(num_classes)
    for j in nearest[q]:
      scores[train_labels[j]] += np.exp(sim[q, j] / temperature)
    ranking = np.argsort(-scores)
    top1 += ranking[0] == test_labels[q]
    top5 += test_labels[q] in ranking[:5]
  return top1 / len(test), top5 / len(test), np.take_along_axis(sim, nearest, 1), train_labels[nearest]


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(NUM_CLASSES, 16))
  train_labels, test_labels = rng.integers(0, NUM_CLASSES, 300), rng.integers(0, NUM_CLASSES, 50)
  # Overlapping classes, so accuracies fall strictly between 0 and 1 and differ between ks.
  train = centres[train_labels] + 2.5 * rng.normal(size=(300, 16))
  test = centres[test_labels] + 2.5 * rng.normal(size=(50, 16))
  return train.astype(np.float32), train_labels, test.astype(np.float32), test_labels


def meshes():
  return {n: sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1)), jax.devices()[:n]) for n in (1, 8)}


def run(data, mesh, memory_chunk):
  train, train_labels, test, test_labels = data
  # Extraction batches of 40 rows (5 per device on 8) and a padded last one in both sets; streamed
  # in chunks of memory_chunk rows per device, the last one padded again.
  memory = features.from_numpy(train, train_labels, mesh, chunk=40)
  queries = features.from_numpy(test, test_labels, mesh, chunk=16)
  return knn.classify(queries, memory, ks=KS, num_classes=NUM_CLASSES, temperature=T, mesh=mesh,
                      memory_chunk=memory_chunk)


def test_knn_matches_numpy_and_does_not_depend_on_device_count(data):
  results = {n: run(data, mesh, memory_chunk={1: 64, 8: 3}[n]) for n, mesh in meshes().items()}
  train, train_labels, test, test_labels = data
  for k in KS:
    top1, top5, _, _ = numpy_knn(train, train_labels, test, test_labels, k, T, NUM_CLASSES)
    assert results[1][f'top1_k{k}'] == pytest.approx(top1, abs=1e-9), k
    assert results[1][f'top5_k{k}'] == pytest.approx(top5, abs=1e-9), k
  assert results[1]['top1_k10'] != results[1]['top1_k20']  # the ks are really different votes
  assert results[8] == results[1]


def test_memory_bank_is_the_valid_rows_normalised_with_their_labels(data):
  train, train_labels, test, test_labels = data
  _, _, want_sims, want_labels = numpy_knn(train, train_labels, test, test_labels, 200, T, NUM_CLASSES)
  for mesh in meshes().values():
    # 300 rows in extraction batches of 40: the last 20 rows of padding must not enter the bank.
    bank = knn.memory_bank(features.from_numpy(train, train_labels, mesh, chunk=40), mesh, memory_chunk=7, k=200)
    assert bank.size == 300
    found = jax.device_get(retrieval.search(knn.normalize(test), bank, k=200, mesh=mesh))
    np.testing.assert_allclose(found.scores, want_sims, atol=1e-5)
    np.testing.assert_array_equal(found.payload, want_labels)


@pytest.mark.parametrize('field, value, message', [
    ('type', 'knnn', "config.evals.probe.type='knnn'; expected one of ('knn', 'linear_probe', 'hummingbird')"),
    ('every', -1, 'config.evals.probe.every=-1; expected an integer >= 0'),
    ('ks', (0, 10), 'config.evals.probe.ks=(0, 10); expected a non-empty tuple of integers >= 1'),
    ('ks', (10, 500), 'k=500 exceeds the 24 training images'),
    ('temperature', 0.0, 'config.evals.probe.temperature=0.0; expected a positive number'),
    ('batch_size', 12, 'config.evals.probe.batch_size=12; expected a positive multiple of the data-parallel size 8'),
    ('kk', 10, 'config.evals.probe.kk is not a field of this evaluator'),
    ('data.root', '/nonexistent', "config.evals.probe.data: split 'train': /nonexistent/train does not exist"),
])
def test_bad_config_is_one_error_naming_the_field(image_folder, field, value, message):
  cfg = ml_collections.ConfigDict(dict(type='knn', every=0, batch_size=8,
                                       data=dict(kind='folder', root=str(image_folder))))
  node, *rest = field.split('.')
  if rest:
    cfg[node][rest[0]] = value
  else:
    cfg[node] = value
  with pytest.raises(ValueError) as e:
    make_evaluator('probe', cfg, meshes()[8])
  assert message in str(e.value)
  assert '\n' not in str(e.value)
