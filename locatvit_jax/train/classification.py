"""ImageNet-style classification pretraining (spec section 5), readable top to bottom.

Sections: config checks -> data -> model and optimizer -> sharded state (resume or init) -> jitted
steps -> the loop (log, evaluate, checkpoint, preemption) -> export.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from locatvit_jax import checkpoint, loading, paths, sharding
from locatvit_jax.data import pipeline, sources
from locatvit_jax.models import vit
from locatvit_jax.train import common, mixup, optim


# -- config ------------------------------------------------------------------------------------------
def model_config(config) -> vit.ViTConfig:
  return vit.model_config(config.model_name, num_classes=config.data.num_classes, **config.model.to_dict())


def check_config(config, mesh) -> vit.ViTConfig:
  """Fails fast, before any data or device work, on values that cannot run."""
  model_cfg = model_config(config)  # ViTConfig validates sizes, dtypes, implementations
  common.check_loop_config(config)
  dp = sharding.batch_parallelism(mesh)
  problems = []
  if config.grad_accum < 1:
    problems.append(f'grad_accum={config.grad_accum}; expected an integer >= 1')
  elif config.batch_size % (dp * config.grad_accum):
    problems.append(f'batch_size={config.batch_size} is not divisible by data-parallel size {dp} '
                    f'x grad_accum {config.grad_accum}')
  if config.batch_size % jax.process_count():
    problems.append(f'batch_size={config.batch_size} is not divisible by {jax.process_count()} processes')
  if config.eval_batch_size % dp:
    problems.append(f'eval_batch_size={config.eval_batch_size} is not divisible by data-parallel size {dp}')
  if config.aug.eval_resize < max(model_cfg.img_size):
    problems.append(f'aug.eval_resize={config.aug.eval_resize} is smaller than img_size={config.model.img_size}; '
                    'expected the short side resized to at least the centre crop')
  if problems:
    raise ValueError('; '.join(problems))
  return model_cfg


def total_and_warmup_steps(config, num_train_examples: int) -> tuple[int, int]:
  steps_per_epoch = max(num_train_examples // config.batch_size, 1)
  total = config.get('total_steps') or int(config.epochs * steps_per_epoch)
  warmup = config.get('warmup_steps') or int(config.warmup_epochs * steps_per_epoch)
  return total, min(warmup, total)


def peak_lr(config) -> float:
  """Linear scaling: optim.lr is the rate for optim.lr_base_batch images (5e-4 per 512)."""
  return config.optim.lr * config.batch_size / config.optim.lr_base_batch


# -- steps -----------------------------------------------------------------------------------------
def soft_cross_entropy(logits, targets):
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def make_train_step(graphdef, config, tx, schedule, num_classes):
  """One optimizer update on a global batch: mixup, forward/backward over micro-batches, AdamW."""
  mix_cfg, accum = config.mixup, config.grad_accum
  base_key = jax.random.key(config.seed)

  def loss_fn(params, rest, images, targets, drop_key):
    # copy=True: fresh Variables at this trace level, so reseeding and dropout may mutate them.
    model = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(model, dropout=drop_key)
    loss = soft_cross_entropy(model(images), targets)
    return loss, common.gaug_scalars(nnx.pop(model, nnx.Intermediate))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, rest, batch):
    # Keys depend only on the step, so a resumed run draws exactly what an uninterrupted one would.
    step_key = jax.random.fold_in(base_key, state['step'])
    mix_key, drop_key = jax.random.split(step_key)
    images, targets = mixup.mixup_cutmix(
        mix_key, batch['image'], batch['label'], num_classes=num_classes,
        mixup_alpha=mix_cfg.mixup_alpha, cutmix_alpha=mix_cfg.cutmix_alpha,
        switch_prob=mix_cfg.switch_prob, label_smoothing=mix_cfg.label_smoothing)

    def micro(carry, xs):
      grads, loss, stats = carry
      i, imgs, tgts = xs
      (l, s), g = grad_fn(state['params'], rest, imgs, tgts, jax.random.fold_in(drop_key, i))
      return (jax.tree.map(jnp.add, grads, g), loss + l, jax.tree.map(jnp.add, stats, s)), None

    split = lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    (_, stats0), _ = jax.eval_shape(grad_fn, state['params'], rest, split(images)[0], split(targets)[0], drop_key)
    init = (zeros, jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats0))
    (grads, loss, stats), _ = jax.lax.scan(micro, init, (jnp.arange(accum), split(images), split(targets)))
    grads, loss, stats = jax.tree.map(lambda x: x / accum, (grads, loss, stats))

    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state}
    scalars = {'loss': loss, 'grad_norm': optax.global_norm(grads), 'lr': schedule(state['step']), **stats}
    return new_state, scalars

  return train_step


def make_eval_step(graphdef):
  """Counts correct top-1 predictions among the valid (non-padding) examples of a global batch."""
  def eval_step(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    correct = (jnp.argmax(model(batch['image']), -1) == batch['label']) * batch['valid']
    return {'correct': correct.sum(), 'count': batch['valid'].sum()}
  return eval_step


def evaluate(eval_step, params, rest, config, mesh, source) -> float:
  loader = eval_loader(config, source)
  correct = count = 0.0
  for batch in loader:
    batch.pop('skipped')  # corrupt images are already masked out through 'valid'
    out = jax.device_get(eval_step(params, rest, sharding.to_global(batch, mesh)))
    correct += float(out['correct'])
    count += float(out['count'])
  return correct / max(count, 1.0)


# -- data ------------------------------------------------------------------------------------------
def train_loader(config, source):
  return pipeline.classification_loader(
      source, train=True, global_batch_size=config.batch_size, img_size=config.model.img_size,
      aug=config.aug, seed=config.seed, worker_count=config.input.worker_count)


def eval_loader(config, source):
  return pipeline.classification_loader(
      source, train=False, global_batch_size=config.eval_batch_size, img_size=config.model.img_size,
      aug=config.aug, seed=config.seed, worker_count=config.input.worker_count)


# -- model, optimizer, jitted steps ---------------------------------------------------------------
@dataclasses.dataclass
class Setup:
  """Everything the loop (and benchmarks/train_step.py) needs besides data and checkpoints."""
  graphdef: nnx.GraphDef
  rest: nnx.State  # non-parameter model state (dropout RNG streams), replicated
  abstract_state: dict
  shardings: dict
  init_state: Callable[[], dict]
  train_step: Callable  # (state, rest, global batch) -> (state, scalars); donates state
  eval_step: Callable  # (params, rest, global batch) -> {'correct', 'count'}


def build(config, model_cfg: vit.ViTConfig, mesh, total_steps: int, warmup_steps: int) -> Setup:
  """Model structure, optimizer and the jitted steps. Only the graphdef lives in Python."""
  def new_model():
    model = vit.ViT(model_cfg, rngs=nnx.Rngs(config.seed))
    model.set_attributes(collect_stats=True, raise_if_not_found=False)
    return model

  graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(new_model), nnx.Param, ...)
  rest = jax.jit(lambda: nnx.split(new_model(), nnx.Param, ...)[2], out_shardings=sharding.replicated(mesh))()
  schedule = optim.warmup_linear_decay(peak_lr(config), total_steps, warmup_steps,
                                       config.optim.warmup_init_lr, config.optim.end_lr)
  tx = optim.adamw(schedule, config.optim, abstract_params)
  abstract_state = common.abstract_train_state(abstract_params, tx)
  shardings = sharding.tree_shardings(abstract_state, mesh)
  init_state = lambda: common.init_train_state(lambda: nnx.state(new_model(), nnx.Param), tx,
                                               abstract_state, shardings)
  # The state is donated, so parameters and optimizer state are updated in place.
  batch_sh = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(graphdef, config, tx, schedule, model_cfg.num_classes),
                       in_shardings=(shardings, None, batch_sh), out_shardings=(shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(shardings['params'], None, batch_sh))
  return Setup(graphdef, rest, abstract_state, shardings, init_state, train_step, eval_step)


# -- the run -----------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, exports. Returns final metrics.

  `devices` (default: all) lets tests and notebooks train on a subset of the local devices.
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  model_cfg = check_config(config, mesh)
  workdir = paths.path(workdir)

  # Data, both splits opened now so that a missing one fails before the first step. The train
  # iterator is part of the checkpoint, so a resumed run continues the same stream.
  train_source = sources.classification_source(config.data, config.data.train_split)
  eval_source = sources.classification_source(config.data, sources.eval_split(config.data))
  total_steps, warmup_steps = total_and_warmup_steps(config, len(train_source))
  train_iter = iter(train_loader(config, train_source))

  setup = build(config, model_cfg, mesh, total_steps, warmup_steps)

  # State: resume from the workdir (any mesh) or initialise in place.
  ckpt = checkpoint.TrainCheckpointer(workdir, save_every=config.checkpoint_every,
                                      max_to_keep=config.keep_checkpoints)
  state, progress = common.restore_or_init(ckpt, train_iter, setup.abstract_state, setup.shardings,
                                           setup.init_state)
  start_step = common.host_int(state['step'])

  # Loop (nothing to do when the workdir holds a finished run).
  logging.info('Training %s for %d steps (%d warmup), batch %d, on mesh %s.',
               config.model_name, total_steps, warmup_steps, config.batch_size, dict(mesh.shape))
  skipped = 0

  def step_fn(state):
    nonlocal skipped
    local = next(train_iter)
    skipped += int(local.pop('skipped').sum())  # corrupt images dropped by this process's workers
    state, scalars = setup.train_step(state, setup.rest, sharding.to_global(local, mesh))
    return state, scalars, {'data/skipped': skipped}

  def evaluate_fn(state, step):
    top1 = evaluate(setup.eval_step, state['params'], setup.rest, config, mesh, eval_source)
    # The best top-1 lives in the checkpoints' progress record, so it survives resumes.
    if config.export_best and top1 > progress.get('best_eval_top1', -1.0):
      progress['best_eval_top1'] = top1
      checkpoint.save_params(workdir / 'export_best', loading.params_dict(state['params']), model_cfg)
    return {'eval_top1': top1}

  state, scalars = common.train_loop(
      state=state, start_step=start_step, total_steps=total_steps, step_fn=step_fn,
      evaluate_fn=evaluate_fn, data_iter=train_iter, ckpt=ckpt, record=json.loads(model_cfg.to_json()),
      progress=progress, workdir=workdir, config=config)
  ckpt.close()
  if start_step >= total_steps:
    logging.info('%s holds a finished run (step %d of %d): nothing to train.', workdir, start_step, total_steps)
    scalars = common.last_logged(workdir, total_steps)

  if start_step < total_steps or not checkpoint.is_params_export(workdir / 'export'):
    checkpoint.save_params(workdir / 'export', loading.params_dict(state['params']), model_cfg)
  logging.info('Done: top-1 %s; params exported to %s.', scalars.get('eval_top1'), workdir / 'export')
  return {'eval_top1': None, **scalars}
