"""DINO self-supervised pretraining (Caron et al. 2021) on the classification trainer's machinery.

The recipe is facebookresearch/dino's main_dino.py as the authors run it with `locatvit_small`
(evaluations/dino of their repository): a student (backbone + DINO head, models/dino_head.py) sees
2 global and 8 local crops (data/multicrop.py); a teacher, the EMA of the student, sees the global
crops; the student matches the teacher's centred, sharpened distribution over out_dim prototypes.

Sections: config checks -> schedules -> loss, centre, teacher update, DINO's AdamW -> data -> model
and sharded state -> the jitted step -> the run (resume, loop, evaluators, export).

The train state is {'step', 'params' (student), 'teacher', 'opt_state', 'center'}: the teacher and the
centre live beside the student, sharded by the same rules (the 65536-wide last layer and the centre
over `tensor`), and are checkpointed with it and the Grain iterator, so a resume is exact. The step
is one jitted function of the global batch: the centre is the mean over every device's teacher
outputs. The export is the teacher's backbone (what DINO evaluates), an ordinary params export.
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

from locatvit_jax import checkpoint, evaluators, loading, paths, sharding
from locatvit_jax.data import multicrop, sources
from locatvit_jax.models import dino_head, registry
from locatvit_jax.train import common

LAST_LAYER = 'dino_head/last_layer'  # the weight-normalised layer (direction and gain), frozen for the first epochs


# -- config ------------------------------------------------------------------------------------------
def backbone_config(config) -> registry.ModelConfig:
  """The backbone: config.model_name with config.model's fields, no classifier, built for the global crops."""
  fields = {**config.model.to_dict(), 'img_size': config.crops.global_size}
  return registry.model_config(config.model_name, num_classes=0, **fields)


def check_config(config, mesh) -> registry.ModelConfig:
  """Fails fast, before any data or device work, on values that cannot run."""
  family = registry.family_of_name(config.model_name).FAMILY
  if family != 'vit':
    raise ValueError(f'model_name={config.model_name!r} is a {family!r} model; DINO here trains the '
                     'ViT family (vit_*, locatvit_*), as the authors did')
  model_cfg = backbone_config(config)
  common.check_loop_config(config)
  multicrop.check_crops_config(config.crops, model_cfg.patch_size)
  dp, d, o = sharding.batch_parallelism(mesh), config.dino, config.optim
  problems = []
  if config.batch_size % dp or config.batch_size % jax.process_count():
    problems.append(f'batch_size={config.batch_size} is not divisible by the data-parallel size {dp} '
                    f'and the {jax.process_count()} processes')
  for name in ('out_dim', 'hidden_dim', 'bottleneck_dim'):
    if not isinstance(d[name], int) or d[name] < 1:
      problems.append(f'dino.{name}={d[name]!r}; expected an integer >= 1')
  for name in ('student_temp', 'teacher_temp', 'warmup_teacher_temp'):
    if not d[name] > 0:
      problems.append(f'dino.{name}={d[name]}; expected a temperature > 0')
  for name, value in (('dino.center_momentum', d.center_momentum), ('dino.momentum_teacher', d.momentum_teacher)):
    if not 0 <= value <= 1:
      problems.append(f'{name}={value}; expected a momentum in [0, 1]')
  if not (o.lr > 0 and o.min_lr >= 0 and o.clip_grad >= 0 and o.weight_decay >= 0 and o.weight_decay_end >= 0):
    problems.append(f'optim lr={o.lr}, min_lr={o.min_lr}, clip_grad={o.clip_grad}, weight_decay={o.weight_decay}, '
                    f'weight_decay_end={o.weight_decay_end}; expected lr > 0 and the others >= 0')
  if problems:
    raise ValueError('; '.join(problems))
  return model_cfg


@dataclasses.dataclass(frozen=True)
class Steps:
  """The run's length in optimizer steps; DINO schedules by iteration and by epoch."""
  total: int
  per_epoch: int
  warmup: int  # learning-rate warmup
  frozen: int  # steps with the last layer frozen

  @classmethod
  def of(cls, config, num_train_examples: int) -> 'Steps':
    per_epoch = config.get('steps_per_epoch') or max(num_train_examples // config.batch_size, 1)
    total = config.get('total_steps') or int(config.epochs * per_epoch)
    return cls(total, per_epoch, min(config.optim.warmup_epochs * per_epoch, total),
               config.dino.freeze_last_layer * per_epoch)


# -- schedules (utils.cosine_scheduler and DINOLoss.teacher_temp_schedule of DINO) -----------------
def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> Callable:
  """Step -> value: linear warmup_start -> base over warmup_steps (both ends included, as
  np.linspace), then base + (final - base) (1 - cos(pi i / n)) / 2 for i = 0..n-1 over the n
  remaining steps; the last value is held after total_steps."""
  n = max(total_steps - warmup_steps, 1)

  def schedule(step):
    t = jnp.minimum(step, total_steps - 1).astype(jnp.float32)
    warm = warmup_start + (base - warmup_start) * t / max(warmup_steps - 1, 1)
    cos = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * (t - warmup_steps) / n))
    return jnp.where(t < warmup_steps, warm, cos)

  return schedule


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int) -> Callable:
  """Epoch -> teacher temperature: linear warmup_temp -> temp over warmup_epochs (np.linspace), then temp."""
  def schedule(epoch):
    e = epoch.astype(jnp.float32)
    return jnp.where(e < warmup_epochs, warmup_temp + (temp - warmup_temp) * e / max(warmup_epochs - 1, 1), temp)
  return schedule


@dataclasses.dataclass(frozen=True)
class Schedules:
  lr: Callable
  weight_decay: Callable
  momentum: Callable  # the teacher's EMA momentum
  teacher_temp: Callable  # by epoch

  @classmethod
  def of(cls, config, steps: Steps) -> 'Schedules':
    o, d = config.optim, config.dino
    peak = o.lr * config.batch_size / o.lr_base_batch  # DINO's linear scaling rule (per 256 images)
    return cls(lr=cosine_schedule(peak, o.min_lr, steps.total, steps.warmup),
               weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, steps.total),
               momentum=cosine_schedule(d.momentum_teacher, 1.0, steps.total),
               teacher_temp=teacher_temp_schedule(d.warmup_teacher_temp, d.teacher_temp,
                                                  d.warmup_teacher_temp_epochs))


# -- loss, centre, teacher update, optimizer ----------------------------------------------------------
def dino_loss(student_logits, teacher_logits, center, teacher_temp, student_temp):
  """DINOLoss: the teacher's softmax((t - center) / teacher_temp) on each global view against the
  student's log_softmax(s / student_temp) on every other view, averaged over the batch and the pairs.

  student_logits (B, V, K), teacher_logits (B, G, K) with the global views first in V; center (1, K).
  """
  g, v = teacher_logits.shape[1], student_logits.shape[1]
  targets = jax.lax.stop_gradient(jax.nn.softmax((teacher_logits - center) / teacher_temp, axis=-1))
  log_probs = jax.nn.log_softmax(student_logits / student_temp, axis=-1)
  ce = -jnp.einsum('bgk,bvk->bgv', targets, log_probs)  # (B, G, V)
  other_view = jnp.arange(g)[:, None] != jnp.arange(v)[None, :]  # a view never predicts itself
  return jnp.sum(jnp.mean(ce, axis=0) * other_view) / jnp.sum(other_view)


def update_center(center, teacher_logits, momentum):
  """center * momentum + (mean teacher output over the global batch and global views) * (1 - momentum)."""
  batch_center = jnp.mean(teacher_logits.reshape(-1, teacher_logits.shape[-1]), axis=0, keepdims=True)
  return center * momentum + batch_center * (1 - momentum)


def ema(teacher, student, momentum):
  """The teacher update: teacher * m + student * (1 - m), every parameter."""
  return jax.tree.map(lambda t, s: t * momentum + s * (1 - momentum), teacher, student)


def clip_per_tensor(grads, max_norm: float):
  """DINO's clip_gradients: each tensor scaled by max_norm / (its norm + 1e-6) when that is below 1
  (not optax's clipping by the global norm)."""
  def clip(g):
    coef = max_norm / (jnp.linalg.norm(g.ravel()) + 1e-6)
    return g * jnp.minimum(coef, 1.0)
  return jax.tree.map(clip, grads)


def decay_mask(params):
  """DINO's get_params_groups: decay every tensor of 2+ dimensions that is not a bias (so pos_embed,
  cls_token and the last layer are decayed, unlike timm's rule)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim > 1 and not sharding.path_key(path).endswith('/bias'), params)


def is_last_layer(params):
  """True at the head's last layer (its direction, and its gain when trained), frozen for the first
  dino.freeze_last_layer epochs: DINO cancels the gradient of every parameter whose name holds 'last_layer'."""
  return jax.tree_util.tree_map_with_path(lambda path, x: LAST_LAYER in sharding.path_key(path), params)


def adamw_init(params) -> dict:
  """PyTorch's AdamW state: moments and a step count per parameter tensor."""
  zeros = lambda: jax.tree.map(jnp.zeros_like, params)
  return {'mu': zeros(), 'nu': zeros(), 'count': jax.tree.map(lambda x: jnp.zeros((), jnp.int32), params)}


def adamw_update(params, grads, state, *, lr, weight_decay, decay, active, b1, b2, eps):
  """One torch.optim.AdamW step. A tensor whose `active` is False had its gradient cancelled (DINO's
  cancel_gradients_last_layer sets it to None), so, as in PyTorch, it is not touched at all: no
  decay, no moment update, no count (its bias correction starts when it first trains)."""
  def one(p, g, mu, nu, count, dec, act):
    count1 = count + 1
    mu1 = b1 * mu + (1 - b1) * g
    nu1 = b2 * nu + (1 - b2) * g * g
    t = count1.astype(jnp.float32)
    denom = jnp.sqrt(nu1) / jnp.sqrt(1 - b2 ** t) + eps
    p1 = p * (1 - lr * weight_decay * dec) - lr / (1 - b1 ** t) * mu1 / denom
    keep = lambda new, old: jnp.where(act, new, old)
    return keep(p1, p), keep(mu1, mu), keep(nu1, nu), keep(count1, count)

  out = jax.tree.map(one, params, grads, state['mu'], state['nu'], state['count'], decay, active)
  pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda o: isinstance(o, tuple))
  return pick(0), {'mu': pick(1), 'nu': pick(2), 'count': pick(3)}


# -- data ------------------------------------------------------------------------------------------
def train_loader(config, source):
  return multicrop.multicrop_loader(source, global_batch_size=config.batch_size, crops=config.crops,
                                    seed=config.seed, worker_count=config.input.worker_count)


# -- model, state, jitted step ----------------------------------------------------------------------
def new_model(config, model_cfg, seed: int) -> dino_head.DINO:
  d = config.dino
  return dino_head.DINO(model_cfg, d.out_dim, hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
                        use_bn=d.use_bn_in_head, norm_last_layer=d.norm_last_layer, rngs=nnx.Rngs(seed))


def make_train_step(graphdef, config, steps: Steps, schedules: Schedules):
  """One DINO iteration on a global batch {'global': (B, 2, G, G, 3), 'local': (B, L, l, l, 3)}."""
  d, o = config.dino, config.optim
  base_key = jax.random.key(config.seed)

  def loss_fn(params, rest, teacher_params, center, batch, drop_key, temp):
    teacher = nnx.merge(graphdef, teacher_params, rest, copy=True)
    teacher.eval()  # DINO builds the teacher without stochastic depth
    teacher_logits = jax.lax.stop_gradient(teacher(batch['global']))
    student = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(student, dropout=drop_key)
    loss = dino_loss(student(batch['global'], batch['local']), teacher_logits, center, temp, d.student_temp)
    return loss, teacher_logits

  def train_step(state, rest, batch):
    step = state['step']
    epoch = step // steps.per_epoch
    # Keys depend only on the step, so a resumed run draws exactly what an uninterrupted one would.
    drop_key = jax.random.fold_in(base_key, step)
    temp = schedules.teacher_temp(epoch)
    (loss, teacher_logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], rest, state['teacher'], state['center'], batch, drop_key, temp)
    if o.clip_grad:
      grads = clip_per_tensor(grads, o.clip_grad)
    last = is_last_layer(state['params'])
    trains_last = step >= steps.frozen
    active = jax.tree.map(lambda is_last: jnp.logical_or(trains_last, not is_last), last)
    lr, wd = schedules.lr(step), schedules.weight_decay(step)
    params, opt_state = adamw_update(state['params'], grads, state['opt_state'], lr=lr, weight_decay=wd,
                                     decay=decay_mask(state['params']), active=active, b1=o.b1, b2=o.b2, eps=o.eps)
    m = schedules.momentum(step)
    new_state = {'step': step + 1, 'params': params, 'opt_state': opt_state,
                 'teacher': ema(state['teacher'], params, m),
                 'center': update_center(state['center'], teacher_logits, d.center_momentum)}
    scalars = {'loss': loss, 'lr': lr, 'weight_decay': wd, 'teacher_momentum': m, 'teacher_temp': temp,
               'grad_norm': optax.global_norm(grads)}
    return new_state, scalars

  return train_step


@dataclasses.dataclass
class Setup:
  """Everything the loop needs besides data and checkpoints."""
  graphdef: nnx.GraphDef
  rest: nnx.State  # non-parameter model state (dropout RNG streams), replicated
  abstract_state: dict
  shardings: dict
  init_state: Callable[[], dict]
  train_step: Callable  # (state, rest, global batch) -> (state, scalars); donates state


def build(config, model_cfg, mesh, steps: Steps) -> Setup:
  make = lambda: new_model(config, model_cfg, config.seed)
  graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[2], out_shardings=sharding.replicated(mesh))()

  def init():
    params = nnx.state(make(), nnx.Param)
    # DINO's teacher starts as a copy of the student.
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'teacher': jax.tree.map(jnp.copy, params),
            'opt_state': adamw_init(params), 'center': jnp.zeros((1, config.dino.out_dim), jnp.float32)}

  abstract_state = jax.eval_shape(init)
  shardings = sharding.tree_shardings(abstract_state, mesh)
  init_state = lambda: jax.jit(init, out_shardings=shardings)()
  train_step = jax.jit(make_train_step(graphdef, config, steps, Schedules.of(config, steps)),
                       in_shardings=(shardings, None, sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, None), donate_argnums=0)
  return Setup(graphdef, rest, abstract_state, shardings, init_state, train_step)


def teacher_backbone(setup: Setup, state: dict):
  """The teacher's backbone in eval mode (its arrays stay where they are): what evaluators and the export see."""
  model = nnx.merge(setup.graphdef, state['teacher'], setup.rest)
  model.eval()
  return model.backbone


# -- the run -----------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints), runs config.evals on the teacher's
  backbone, exports it to WORKDIR/export. Returns the last logged scalars."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model_cfg = check_config(config, mesh)
  evals = evaluators.make_evaluators(config.get('evals'), mesh)
  workdir = paths.path(workdir)

  # Data: the train iterator is part of the checkpoint, so a resumed run continues the same stream.
  train_source = sources.classification_source(config.data, config.data.train_split)
  steps = Steps.of(config, len(train_source))
  train_iter = iter(train_loader(config, train_source))
  setup = build(config, model_cfg, mesh, steps)

  ckpt = checkpoint.TrainCheckpointer(workdir, save_every=config.checkpoint_every,
                                      max_to_keep=config.keep_checkpoints)
  state, progress = common.restore_or_init(ckpt, train_iter, setup.abstract_state, setup.shardings,
                                           setup.init_state)
  start_step = common.host_int(state['step'])
  logging.info('DINO: %s for %d steps (%d per epoch, %d warmup, last layer frozen for %d), batch %d, mesh %s.',
               config.model_name, steps.total, steps.per_epoch, steps.warmup, steps.frozen, config.batch_size,
               dict(mesh.shape))

  def step_fn(state):
    state, scalars = setup.train_step(state, setup.rest, sharding.to_global(next(train_iter), mesh))
    return state, scalars, {}

  state, scalars = common.train_loop(
      state=state, start_step=start_step, total_steps=steps.total, step_fn=step_fn,
      evaluate_fn=lambda state, step: {}, data_iter=train_iter, ckpt=ckpt,
      record=json.loads(model_cfg.to_json()), progress=progress, workdir=workdir, config=config,
      evaluators=evaluators.Runner(evals, workdir, steps.total, to_model=lambda s: teacher_backbone(setup, s)))
  ckpt.close()
  if start_step >= steps.total:
    logging.info('%s holds a finished run (step %d of %d): nothing to train.', workdir, start_step, steps.total)
    scalars = common.last_logged(workdir, steps.total)
  if start_step < steps.total or not checkpoint.is_params_export(workdir / 'export'):
    checkpoint.save_params(workdir / 'export', loading.params_dict(state['teacher']['backbone']), model_cfg)
  logging.info('Done: loss %s; the teacher backbone exported to %s.', scalars.get('loss'), workdir / 'export')
  return scalars
