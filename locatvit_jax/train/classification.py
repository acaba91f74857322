"""ImageNet-style classification: pretraining (spec section 5), fine-tuning and evaluation.

Sections: config checks -> data -> model and optimizer -> sharded state (resume, init from
`config.init`, or fresh) -> jitted steps -> the loop (log, evaluate, checkpoint, preemption) -> export.

`config.init` (anything `locatvit_jax.load` reads: our exports and workdirs, the authors' weights)
starts training from those parameters; its architecture must match the config's, and the head is
kept when the class counts agree, else made fresh (fine-tuning on a new label set).
`config.eval_only` evaluates the workdir's newest checkpoint, or else `config.init`, and trains nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from locatvit_jax import checkpoint, evaluators, loading, paths, sharding
from locatvit_jax.data import pipeline, sources
from locatvit_jax.models import registry
from locatvit_jax.train import common, mixup, optim


# -- config ------------------------------------------------------------------------------------------
def model_config(config) -> registry.ModelConfig:
  """The run's model (any family: config.model_name picks it) with config.model's fields."""
  return registry.model_config(config.model_name, num_classes=config.data.num_classes, **config.model.to_dict())


# What a checkpoint does not fix about the model: classes, drop path, dtype, attention kernel and remat
# are the run's (config.model); the input size too (the model resamples its position embedding).
RUN_FIELDS = ('num_classes', 'drop_path', 'dtype', 'gaug_impl', 'remat', 'img_size')


def architecture(cfg: registry.ModelConfig) -> dict:
  """What a checkpoint fixes about the model: its family and every field but the run's."""
  return {'family': cfg.FAMILY,
          **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_FIELDS}}


def load_init(config, model_cfg: registry.ModelConfig) -> tuple[registry.ModelConfig, dict]:
  """(the run's model config, flat params to start from) for `config.init`, checked against the config.

  The position embedding keeps the checkpoint's grid (its img_size), so inputs of the config's size
  go through the model's own resampling, as at inference. The head is dropped when the checkpoint
  has another number of classes: the run's head starts fresh.
  """
  init = common.load_model(config.init, prr_if_unstated=model_cfg.prr)
  held, wanted = architecture(init.cfg), architecture(model_cfg)
  mismatched = [f'{f}={held.get(f)!r} (config: {wanted.get(f)!r})'
                for f in sorted(held.keys() | wanted.keys(), key=list({**held, **wanted}).index)
                if held.get(f) != wanted.get(f)]
  if mismatched:
    raise ValueError(f'config.init={config.init} holds a model with {", ".join(mismatched)}; use the config of '
                     'its size and variant (e.g. configs/vit_ti.py:vit) or set those --config.model fields')
  params = loading.flatten(jax.tree.map(np.asarray, loading.get_params(init)))
  if init.cfg.num_classes != model_cfg.num_classes:
    logging.info('config.init has %d classes, the run %d: the head starts fresh.', init.cfg.num_classes,
                 model_cfg.num_classes)
    params = {k: v for k, v in params.items() if not k.startswith('head/')}
  return dataclasses.replace(model_cfg, img_size=init.cfg.img_size), params


def check_config(config, mesh) -> registry.ModelConfig:
  """Fails fast, before any data or device work, on values that cannot run."""
  model_cfg = model_config(config)  # the config class validates sizes, dtypes, implementations
  common.check_loop_config(config)
  dp = sharding.batch_parallelism(mesh)
  problems = []
  if config.grad_accum < 1:
    problems.append(f'grad_accum={config.grad_accum}; expected an integer >= 1')
  elif config.batch_size % (dp * config.grad_accum):
    problems.append(f'batch_size={config.batch_size} is not divisible by data-parallel size {dp} '
                    f'x grad_accum {config.grad_accum}')
  else:
    rows, group = config.batch_size // (dp * config.grad_accum), config.mixup.group_size
    if group < 1 or (group < rows and rows % group):
      problems.append(f'mixup.group_size={group} does not divide the {rows} images each device mixes per '
                      f'micro-batch; expected a divisor of {rows}, or at least {rows}')
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


def lr_schedule(config, total_steps: int, warmup_steps: int):
  return optim.warmup_linear_decay(peak_lr(config), total_steps, warmup_steps, config.optim.warmup_init_lr,
                                   config.optim.end_lr)


def mixup_group(config, data_parallel: int) -> int:
  """How many images mix together. timm mixes each GPU's loader batch on its own, so a group never
  spans devices or micro-batches: mixup.group_size, or one device's share of a micro-batch if smaller."""
  return min(config.mixup.group_size, config.batch_size // (data_parallel * config.grad_accum))


# -- steps -----------------------------------------------------------------------------------------
def soft_cross_entropy(logits, targets):
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def make_train_step(graphdef, config, tx, schedule, num_classes, mix_group):
  """One optimizer update on a global batch: per micro-batch mixup, random erasing, forward/backward;
  then AdamW. `mix_group` is mixup_group(): mixing and erasing never move rows between devices."""
  accum = config.grad_accum
  base_key = jax.random.key(config.seed)
  augment = functools.partial(mixup.mix_then_erase, num_classes=num_classes, erase_prob=config.aug.erase_prob,
                              **{**config.mixup.to_dict(), 'group_size': mix_group})

  def loss_fn(params, rest, images, targets, drop_key):
    # copy=True: fresh Variables at this trace level, so reseeding and dropout may mutate them.
    model = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(model, dropout=drop_key)
    loss = soft_cross_entropy(model(images), targets)
    return loss, common.gaug_scalars(nnx.pop(model, nnx.Intermediate))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_grads(params, rest, key, images, labels):
    # timm augments each GPU's loader batch, which is one micro-batch of one device here.
    aug_key, drop_key = jax.random.split(key)
    images, targets = augment(aug_key, images, labels)
    return grad_fn(params, rest, images, targets, drop_key)

  def train_step(state, rest, batch):
    # Keys depend only on the step, so a resumed run draws exactly what an uninterrupted one would.
    step_key = jax.random.fold_in(base_key, state['step'])

    def micro(carry, xs):
      grads, loss, stats = carry
      i, imgs, labels = xs
      (l, s), g = micro_grads(state['params'], rest, jax.random.fold_in(step_key, i), imgs, labels)
      return (jax.tree.map(jnp.add, grads, g), loss + l, jax.tree.map(jnp.add, stats, s)), None

    # Micro-batch i is rows i::accum: each device splits its own rows of the batch-sharded axis
    # (check_config keeps the per-device batch a multiple of accum), so nothing moves between
    # devices; consecutive rows (x.reshape((accum, -1) + ...)) would reshard the batch.
    split = lambda x: jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0)
    images, labels = split(batch['image']), split(batch['label'])
    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    (_, stats0), _ = jax.eval_shape(micro_grads, state['params'], rest, step_key, images[0], labels[0])
    init = (zeros, jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats0))
    (grads, loss, stats), _ = jax.lax.scan(micro, init, (jnp.arange(accum), images, labels))
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


def build(config, model_cfg: registry.ModelConfig, mesh, total_steps: int, warmup_steps: int,
          pretrained: dict | None = None) -> Setup:
  """Model structure, optimizer and the jitted steps. Only the graphdef lives in Python.

  `pretrained` (flat '/'-paths -> arrays, from `load_init`) replaces those initial parameters.
  """
  def new_model():
    model = registry.build(model_cfg, rngs=nnx.Rngs(config.seed))
    model.set_attributes(collect_stats=True, raise_if_not_found=False)
    return model

  def initial_params(pretrained):
    params = nnx.state(new_model(), nnx.Param)
    if pretrained:
      flat = loading.flatten(nnx.to_pure_dict(params))
      flat.update({k: jnp.asarray(v, flat[k].dtype) for k, v in pretrained.items()})
      nnx.replace_by_pure_dict(params, loading.unflatten(flat))
    return params

  graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(new_model), nnx.Param, ...)
  rest = jax.jit(lambda: nnx.split(new_model(), nnx.Param, ...)[2], out_shardings=sharding.replicated(mesh))()
  schedule = lr_schedule(config, total_steps, warmup_steps)
  tx = optim.adamw(schedule, config.optim, optim.decay_mask(abstract_params))
  abstract_state = common.abstract_train_state(abstract_params, tx)
  shardings = sharding.tree_shardings(abstract_state, mesh)
  # The pretrained arrays are an argument, not constants baked into the initialiser.
  init_state = lambda: common.init_train_state(initial_params, tx, abstract_state, shardings, pretrained)
  # The state is donated, so parameters and optimizer state are updated in place.
  batch_sh = sharding.batch_sharding(mesh)
  mix_group = mixup_group(config, sharding.batch_parallelism(mesh))
  if mix_group == 1 and (config.mixup.mixup_alpha or config.mixup.cutmix_alpha):
    logging.warning('Each device holds one image per micro-batch: mixup and cutmix have nothing to mix.')
  train_step = jax.jit(make_train_step(graphdef, config, tx, schedule, model_cfg.num_classes, mix_group),
                       in_shardings=(shardings, None, batch_sh), out_shardings=(shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(shardings['params'], None, batch_sh))
  return Setup(graphdef, rest, abstract_state, shardings, init_state, train_step, eval_step)


def eval_model(setup: Setup, state: dict):
  """The model of a train state in eval mode (its arrays stay where they are), for config.evals."""
  model = nnx.merge(setup.graphdef, state['params'], setup.rest)
  model.eval()
  return model


# -- evaluation only ---------------------------------------------------------------------------------
def evaluate_checkpoint(config, workdir, mesh, eval_source) -> dict:
  """config.eval_only: top-1 of the workdir's newest checkpoint, else of config.init. Trains nothing."""
  step_dir = checkpoint.find_training_step(workdir)
  source = step_dir or config.init
  if not source:
    raise ValueError(f'eval_only=True but {workdir} holds no checkpoints and config.init is empty; '
                     'expected one of them to evaluate')
  model = common.load_model(source, 'config.init=' if step_dir is None else '', model_config(config).prr,
                            dtype=config.model.dtype, gaug_impl=config.model.gaug_impl)
  if model.cfg.num_classes != config.data.num_classes:
    raise ValueError(f'{source} has {model.cfg.num_classes} classes but data.num_classes={config.data.num_classes}')
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  param_sh = sharding.tree_shardings(params, mesh)
  eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(param_sh, None, sharding.batch_sharding(mesh)))
  top1 = evaluate(eval_step, jax.device_put(params, param_sh), jax.device_put(rest, sharding.replicated(mesh)),
                  config, mesh, eval_source)
  step = int(step_dir.name) if step_dir else 0
  result = {'eval_top1': top1, 'eval_examples': len(eval_source), 'checkpoint': str(source), 'step': step}
  if jax.process_index() == 0:
    paths.write_text(workdir / common.eval_result_name(step), json.dumps(result))
  logging.info('Top-1 of %s on %s: %.4f.', source, eval_source, top1)
  return result


# -- the run -----------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, exports. Returns final metrics.

  `devices` (default: all) lets tests and notebooks train on a subset of the local devices.
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  model_cfg = check_config(config, mesh)
  # config.evals (k-NN, linear probe, Hummingbird, ...): validated and their data opened before any work.
  evals = evaluators.make_evaluators(config.get('evals'), mesh)
  workdir = paths.path(workdir)
  eval_source = sources.classification_source(config.data, sources.eval_split(config.data))
  if config.eval_only:
    return evaluate_checkpoint(config, workdir, mesh, eval_source)
  pretrained = None
  if config.init:
    model_cfg, pretrained = load_init(config, model_cfg)

  # Data, both splits opened now so that a missing one fails before the first step. The train
  # iterator is part of the checkpoint, so a resumed run continues the same stream.
  train_source = sources.classification_source(config.data, config.data.train_split)
  class_names = getattr(train_source, 'classes', None)  # image folders name their classes; TFDS sources do not
  total_steps, warmup_steps = total_and_warmup_steps(config, len(train_source))
  train_iter = iter(train_loader(config, train_source))

  setup = build(config, model_cfg, mesh, total_steps, warmup_steps, pretrained)

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
      checkpoint.save_params(workdir / 'export_best', loading.params_dict(state['params']), model_cfg, class_names)
    return {'eval_top1': top1}

  state, scalars = common.train_loop(
      state=state, start_step=start_step, total_steps=total_steps, step_fn=step_fn,
      evaluate_fn=evaluate_fn, data_iter=train_iter, ckpt=ckpt, record=json.loads(model_cfg.to_json()),
      progress=progress, workdir=workdir, config=config,
      evaluators=evaluators.Runner(evals, workdir, total_steps, to_model=lambda state: eval_model(setup, state)))
  ckpt.close()
  if start_step >= total_steps:
    logging.info('%s holds a finished run (step %d of %d): nothing to train.', workdir, start_step, total_steps)
    scalars = common.last_logged(workdir, total_steps)

  if start_step < total_steps or not checkpoint.is_params_export(workdir / 'export'):
    checkpoint.save_params(workdir / 'export', loading.params_dict(state['params']), model_cfg, class_names)
  logging.info('Done: top-1 %s; params exported to %s.', scalars.get('eval_top1'), workdir / 'export')
  return {'eval_top1': None, **scalars}
