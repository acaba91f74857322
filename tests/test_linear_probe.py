"""Linear probe against a NumPy run of the same optimiser (SGD, momentum, weight decay, per-epoch cosine)."""

import jax
import ml_collections
import numpy as np
import pytest

from locatvit_jax import sharding
from locatvit_jax.evaluators import features, linear_probe, make_evaluator

K = 3


def numpy_probe(x, y, w, b, *, epochs, lr, momentum, weight_decay, batch=None, order=None):
  """Training written from the protocol: PyTorch SGD semantics, lr cosine-annealed once per epoch.
  Full batch by default; else `batch` rows at a time in the order `order(epoch)` (last partial batch dropped)."""
  x, w, b = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
  onehot = np.eye(K)[y]
  mom_w, mom_b, losses = np.zeros_like(w), np.zeros_like(b), []
  batch = batch or len(y)
  for e in range(epochs):
    rows = np.arange(len(y)) if order is None else order(e)
    step_losses = []
    for s in range(len(y) // batch):
      idx = rows[s * batch:(s + 1) * batch]
      z = x[idx] @ w + b
      z -= z.max(1, keepdims=True)
      p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
      step_losses.append(-np.mean(np.log(p[np.arange(batch), y[idx]])))
      dz = (p - onehot[idx]) / batch
      grad_w, grad_b = x[idx].T @ dz + weight_decay * w, dz.sum(0) + weight_decay * b
      mom_w, mom_b = momentum * mom_w + grad_w, momentum * mom_b + grad_b
      step = lr * 0.5 * (1 + np.cos(np.pi * e / epochs))
      w, b = w - step * mom_w, b - step * mom_b
    losses.append(np.mean(step_losses))
  return w, b, np.array(losses)


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(1)
  centres = 2.0 * rng.normal(size=(K, 8))
  make = lambda n: (lambda y: ((centres[y] + rng.normal(size=(n, 8))).astype(np.float32), y))(rng.integers(0, K, n))
  return make(40), make(30)


def meshes():
  return {n: sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1)), jax.devices()[:n]) for n in (1, 8)}


OPTS = dict(epochs=20, lr=0.1, lr_base_batch=40, momentum=0.9, weight_decay=1e-3, seed=0)


def test_full_batch_probe_equals_numpy_and_learns(data):
  (x, y), (x_eval, y_eval) = data
  mesh = meshes()[8]
  feats = features.from_numpy(x, y, mesh, chunk=16)  # 3 chunks, the last one padded
  params, losses = linear_probe.train(feats, K, batch_size=64, mesh=mesh, **OPTS)  # 64 > 40 rows: full batch
  init = jax.device_get(linear_probe.init_params(jax.random.key(0), 8, K))
  opts = {k: OPTS[k] for k in ('epochs', 'lr', 'momentum', 'weight_decay')}
  w, b, want_losses = numpy_probe(x, y, init['w'], init['b'], **opts)
  np.testing.assert_allclose(np.asarray(params['w']), w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(params['b']), b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(losses), want_losses, rtol=1e-4, atol=1e-6)
  assert want_losses[-1] < 0.5 * want_losses[0]
  acc = linear_probe.accuracy(params, features.from_numpy(x_eval, y_eval, mesh, chunk=16))
  want = np.mean(np.argmax(x_eval @ w + b, 1) == y_eval)
  assert acc == {'top1': want} and want > 0.9


def test_minibatch_probe_equals_numpy_on_any_device_count(data):
  (x, y), _ = data
  out = {}
  for n, mesh in meshes().items():
    params, losses = linear_probe.train(features.from_numpy(x, y, mesh, chunk=16), K, batch_size=12, mesh=mesh,
                                        **OPTS)
    out[n] = jax.device_get((params, losses))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out[1], out[8])
  # 3 steps of 12 rows per epoch (4 rows dropped), in the probe's own shuffled order.
  init = jax.device_get(linear_probe.init_params(jax.random.key(0), 8, K))
  order = lambda e: np.asarray(linear_probe.epoch_order(OPTS['seed'], e, 40))
  opts = {k: OPTS[k] * (12 / OPTS['lr_base_batch'] if k == 'lr' else 1)  # linear scaling
          for k in ('epochs', 'lr', 'momentum', 'weight_decay')}
  w, b, losses = numpy_probe(x, y, init['w'], init['b'], batch=12, order=order, **opts)
  np.testing.assert_allclose(out[8][0]['w'], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[8][1], losses, rtol=1e-4, atol=1e-6)


def test_gather_rows_reads_each_row_from_its_device(data):
  (x, y), _ = data
  mesh = meshes()[8]
  feats = features.from_numpy(x, y, mesh, chunk=16)
  rows = np.array([39, 0, 17, 5, 16, 31])
  np.testing.assert_array_equal(np.asarray(linear_probe.gather_rows(feats, rows, mesh)), x[rows])


@pytest.mark.parametrize('field, value, message', [
    ('epochs', 0, 'config.evals.lin.epochs=0; expected an integer >= 1'),
    ('momentum', 1.0, 'config.evals.lin.momentum=1.0; expected a number in [0, 1)'),
    ('weight_decay', -0.1, 'config.evals.lin.weight_decay=-0.1; expected a number >= 0'),
    ('lr', 0.0, 'config.evals.lin.lr=0.0; expected a positive number'),
    ('ks', (10,), 'config.evals.lin.ks is not a field of this evaluator'),
])
def test_bad_config_is_one_error_naming_the_field(image_folder, field, value, message):
  cfg = ml_collections.ConfigDict(dict(type='linear_probe', every=0, batch_size=8,
                                       data=dict(kind='folder', root=str(image_folder))))
  cfg[field] = value
  with pytest.raises(ValueError, match=None) as e:
    make_evaluator('lin', cfg, meshes()[8])
  assert str(e.value).startswith(message)
