"""Linear probe: a linear classifier trained on frozen features, top-1 on the evaluation split.

DINO's eval_linear.py (facebookresearch/dino; the authors run it with --n_last_blocks 1) trains
nn.Linear (weights N(0, 0.01), bias 0) with SGD, momentum 0.9, no weight decay, lr 0.001 per 256
images (linear scaling), a cosine schedule to 0 stepped once per epoch, for 100 epochs, on features
recomputed for every batch from RandomResizedCrop + flip views; it evaluates after every epoch and
reports the best validation top-1. Here, where we differ:
* features are extracted once, under the evaluation transform, with no augmentation (the probe then
  costs a few seconds, so it can run periodically during pretraining); they are model.pooled_features,
  what the classifier head reads (final norm and PRR), where DINO concatenates the normed class
  tokens of the last n blocks;
* weight decay is configurable (default 0, as DINO), applied like PyTorch's SGD (added to the
  gradient before momentum, bias included);
* epochs draw a fresh random order of the training rows and drop the last partial batch;
* we report the top-1 after the last epoch: picking the best epoch on the evaluation split selects on
  the test data.

Everything after extraction is one jitted program. The features stay sharded as extracted (see
features.py); a batch is gathered from the devices holding its rows (one psum), and the classifier
is small enough to be updated redundantly on every device, so the result does not depend on the
number of devices.

Config (config.evals.NAME): type='linear_probe', every, data (features.DATA_DEFAULTS), epochs=100,
lr=0.001 (per lr_base_batch=256 images), momentum=0.9, weight_decay=0.0, probe_batch_size=1024,
batch_size=256 (global images per extraction batch), seed=0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from locatvit_jax import sharding
from locatvit_jax.evaluators import features

DEFAULTS = dict(epochs=100, lr=0.001, lr_base_batch=256, momentum=0.9, weight_decay=0.0, probe_batch_size=1024,
                batch_size=256, seed=0)
FIELDS = ('type', 'every', 'data', *DEFAULTS)
HIGHEST = jax.lax.Precision.HIGHEST  # float32 products on every backend, as DINO trains in float32


def init_params(key, dim: int, num_classes: int) -> dict:
  """DINO's LinearClassifier initialisation: weights N(0, 0.01^2), bias 0."""
  return {'w': 0.01 * jax.random.normal(key, (dim, num_classes), jnp.float32),
          'b': jnp.zeros((num_classes,), jnp.float32)}


def logits(params: dict, x: jax.Array) -> jax.Array:
  return jnp.dot(x, params['w'], precision=HIGHEST) + params['b']


def optimizer(lr: float, momentum: float, weight_decay: float, epochs: int, steps_per_epoch: int):
  """SGD with momentum and PyTorch-style weight decay; lr cosine-annealed to 0, changed once per epoch."""
  def schedule(count):
    epoch = count // steps_per_epoch
    return lr * 0.5 * (1 + jnp.cos(jnp.pi * epoch / epochs))
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))


def epoch_order(seed: int, epoch, n: int) -> jax.Array:
  """The order of the n training rows in `epoch`: a fresh permutation per epoch, from the seed."""
  return jax.random.permutation(jax.random.fold_in(jax.random.key(seed + 1), epoch), n)


def gather_rows(feats: features.FeatureSet, rows: jax.Array, mesh) -> jax.Array:
  """features rows `rows` (global row ids, replicated) as a replicated (len(rows), C) array: each device
  contributes the rows it holds, one psum adds them up (every other device adds an exact zero)."""
  chunk = feats.features.shape[1]

  def per_device(local, rows):
    per_dev = local.shape[1]
    here = jax.lax.axis_index(sharding.BATCH_AXES)
    c, r = rows // chunk, rows % chunk
    mine = (r // per_dev) == here
    x = jnp.where(mine[:, None], local[c, r % per_dev], 0.0)
    return jax.lax.psum(x, sharding.BATCH_AXES)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(*features.ROWS, None), P()), out_specs=P(),
                       check_vma=False)(feats.features, rows)


@functools.partial(jax.jit, static_argnames=('epochs', 'batch', 'lr', 'momentum', 'weight_decay', 'mesh'))
def _train(feats, rows, labels, params, seed, *, epochs, batch, lr, momentum, weight_decay, mesh):
  steps = rows.shape[0] // batch
  tx = optimizer(lr, momentum, weight_decay, epochs, steps)

  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()

  def epoch(carry, e):
    def step(carry, idx):
      params, opt_state = carry
      x = gather_rows(feats, rows[idx], mesh)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, labels[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    order = epoch_order(seed, e, rows.shape[0])[:steps * batch]
    carry, losses = jax.lax.scan(step, carry, order.reshape(steps, batch))
    return carry, losses.mean()

  (params, _), losses = jax.lax.scan(epoch, (params, tx.init(params)), jnp.arange(epochs))
  return params, losses


def train(feats: features.FeatureSet, num_classes: int, *, epochs: int, lr: float, lr_base_batch: int,
          momentum: float, weight_decay: float, batch_size: int, seed: int, mesh):
  """(params {'w', 'b'}, mean training loss of each epoch) of the probe trained on the valid rows."""
  valid, labels = (np.asarray(a).reshape(-1) for a in _replicated(mesh)(feats.valid, feats.labels))
  rows = np.flatnonzero(valid)
  batch = min(batch_size, len(rows))
  params = init_params(jax.random.key(seed), feats.features.shape[-1], num_classes)
  # Placed on the whole mesh (replicated): every process passes the same values, as multi-host jit needs.
  rows, labels, params = jax.device_put((rows.astype(np.int32), labels[rows].astype(np.int32), params),
                                        sharding.replicated(mesh))
  return _train(feats, rows, labels, params, seed, epochs=epochs, batch=batch, lr=float(lr * batch / lr_base_batch),
                momentum=float(momentum), weight_decay=float(weight_decay), mesh=mesh)


@functools.lru_cache
def _replicated(mesh):
  # Labels and validity of every row on every process (small: 5 bytes a row), for the host-side index.
  return jax.jit(lambda *xs: xs, out_shardings=sharding.replicated(mesh))


@jax.jit
def _accuracy_counts(params, feats):
  out = logits(params, feats.features)
  top = jax.lax.top_k(out, min(5, out.shape[-1]))[1]
  hit = top == feats.labels[..., None]
  return {'top1': jnp.sum(hit[..., 0] & feats.valid), 'top5': jnp.sum(jnp.any(hit, -1) & feats.valid)}


def accuracy(params: dict, feats: features.FeatureSet) -> dict[str, float]:
  """Top-1 (and, with at least 5 classes, top-5) accuracy in [0, 1] over the valid rows."""
  counts = jax.device_get(_accuracy_counts(params, feats))
  n = max(feats.num_valid, 1)
  out = {'top1': int(counts['top1']) / n}
  if params['b'].shape[0] >= 5:
    out['top5'] = int(counts['top5']) / n
  return out


class Evaluator:
  """Linear-probe top-1 of model.pooled_features (module docstring)."""

  def __init__(self, name: str, cfg, mesh):
    prefix = f'config.evals.{name}'
    features.check_fields(prefix, cfg, FIELDS)
    self.name, self.every, self.mesh = name, cfg.get('every', 0), mesh
    self.data = features.data_config(prefix, cfg)
    opts = {k: cfg.get(k, v) for k, v in DEFAULTS.items()}
    for field in ('epochs', 'lr_base_batch', 'probe_batch_size'):
      if isinstance(opts[field], bool) or not isinstance(opts[field], int) or opts[field] < 1:
        raise ValueError(f'{prefix}.{field}={opts[field]!r}; expected an integer >= 1')
    for field, lo in (('lr', 'a positive number'), ('momentum', 'a number in [0, 1)'),
                      ('weight_decay', 'a number >= 0')):
      v = opts[field]
      ok = isinstance(v, (int, float)) and math.isfinite(v) and (
          v > 0 if field == 'lr' else 0 <= v < 1 if field == 'momentum' else v >= 0)
      if not ok:
        raise ValueError(f'{prefix}.{field}={v!r}; expected {lo}')
    if isinstance(opts['seed'], bool) or not isinstance(opts['seed'], int):
      raise ValueError(f'{prefix}.seed={opts["seed"]!r}; expected an integer')
    features.check_batch_size(prefix, opts['batch_size'], mesh)
    self.opts = opts
    self.train_source = features.open_split(prefix, self.data, self.data.train_split)
    self.eval_source = features.open_split(prefix, self.data, features.sources.eval_split(self.data))
    self.num_classes = self.train_source.num_classes

  def run(self, model) -> dict:
    o = self.opts
    train_feats = features.extract(model, self.train_source, self.data, o['batch_size'], self.mesh)
    eval_feats = features.extract(model, self.eval_source, self.data, o['batch_size'], self.mesh)
    params, losses = train(train_feats, self.num_classes, epochs=o['epochs'], lr=o['lr'],
                           lr_base_batch=o['lr_base_batch'], momentum=o['momentum'],
                           weight_decay=o['weight_decay'], batch_size=o['probe_batch_size'], seed=o['seed'],
                           mesh=self.mesh)
    return {**accuracy(params, eval_feats), 'train_loss': float(jax.device_get(losses)[-1]),
            'train_examples': float(train_feats.num_valid)}
