"""What both trainers share: sharded train state, resume, preemption, logging, export.

The train state is a plain dict {'step', 'params', 'opt_state'} of (sharded) arrays; the model's
structure lives in an NNX graphdef that the jitted steps merge with the params, so Python stays out
of the loop (nnx.split -> jax.jit -> nnx.merge).
"""

from __future__ import annotations

import math
import pathlib
import shutil
import signal
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from locatvit_jax import checkpoint, loading, metrics, paths, run_info


class NonFiniteLossError(RuntimeError):
  pass


# -- config ----------------------------------------------------------------------------------------
def check_loop_config(config) -> None:
  """The loop's own settings (train_loop's docstring), checked before any work."""
  problems = [f'{name}={config[name]}; expected an integer >= 1'
              for name in ('log_every', 'checkpoint_every', 'keep_checkpoints', 'batch_size')
              if not isinstance(config[name], int) or config[name] < 1]
  if not isinstance(config.eval_every, int) or config.eval_every < 0:
    problems.append(f'eval_every={config.eval_every}; expected an integer >= 0 (0: at the end only)')
  profile = tuple(config.get('profile_steps') or ())
  if profile and not (len(profile) == 2 and all(isinstance(s, int) for s in profile) and 1 <= profile[0] < profile[1]):
    problems.append(f'profile_steps={profile}; expected () or (start, stop) with 1 <= start < stop')
  if problems:
    raise ValueError('; '.join(problems))


def load_model(path, setting: str = 'config.init=', prr_if_unstated: bool | None = None, **overrides):
  """`locatvit_jax.load(path, **overrides)`; a checkpoint that cannot be read is one ValueError that
  names the setting which pointed at it (`setting` prefixes the path).

  A bare state dict cannot tell whether its model uses PRR (it has no parameters): a trainer whose
  config states the architecture passes that as `prr_if_unstated`; the files win where they say.
  """
  try:
    return loading.load(path, prr_if_unstated=prr_if_unstated, **overrides)
  except (FileNotFoundError, ValueError, ImportError) as e:  # ImportError: a .pth without torch
    raise ValueError(f'{setting}{path} cannot be loaded: {e}') from e


# -- state ---------------------------------------------------------------------------------------
def abstract_train_state(params_abstract, tx: optax.GradientTransformation) -> dict:
  return {
      'step': jax.ShapeDtypeStruct((), jnp.int32),
      'params': params_abstract,
      'opt_state': jax.eval_shape(tx.init, params_abstract),
  }


def init_train_state(init_params_fn, tx, abstract_state, shardings, *args) -> dict:
  """Creates params and optimizer state directly in their shardings (no host copy of the model).

  `init_params_fn(*args)` gives the initial params.
  """
  def init(*args):
    params = init_params_fn(*args)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  return jax.jit(init, out_shardings=shardings)(*args)


def with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def restore_or_init(ckpt: checkpoint.TrainCheckpointer, data_iter, abstract_state, shardings, init_fn):
  """(state, progress): resumed from the newest checkpoint in the workdir (state, data position and
  the loop's progress record), else initialised with an empty progress record."""
  step = ckpt.latest_step()
  if step is None:
    logging.info('No checkpoint in %s: starting from scratch.', ckpt.directory)
    return init_fn(), {}
  logging.info('Resuming from %s/%d.', ckpt.directory, step)
  return ckpt.restore(step, with_shardings(abstract_state, shardings), data_iter)


# -- preemption ----------------------------------------------------------------------------------
class PreemptionGuard:
  """Stops the loop after a step that every process agrees on, so the state in flight is saved.

  One process: SIGTERM sets a flag the loop polls. Several processes: the decision must be
  collective, so JAX's preemption service (which receives the SIGTERM notices through the
  coordination service) picks the sync step; installing our own handler there would hide them.
  """

  def __init__(self, ckpt: checkpoint.TrainCheckpointer):
    self._ckpt = ckpt
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint after this step, then exiting.')
    self._signalled = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._ckpt.reached_preemption(step)
    return self._signalled

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# -- logging ---------------------------------------------------------------------------------------
def fetch_scalars(device_metrics: dict) -> dict[str, float]:
  """Pulls a dict of scalar device arrays to Python floats (one transfer)."""
  return {k: float(v) for k, v in jax.device_get(device_metrics).items()}


def check_finite(scalars: dict[str, float], step: int) -> None:
  if not math.isfinite(scalars['loss']):
    raise NonFiniteLossError(
        f'loss is {scalars["loss"]} at step {step}: stopping; the last good checkpoint is kept. '
        'Lower the learning rate, enable grad_clip, or use float32 compute.')


class Throughput:
  """Images per second between two log points (wall clock, includes input pipeline stalls).

  The first call only sets the mark (0.0), so compilation never counts as training time.
  """

  def __init__(self, images_per_step: int):
    self.images_per_step = images_per_step
    self._t, self._step = time.perf_counter(), None

  def __call__(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self._step) * self.images_per_step / (now - self._t) if self._step is not None else 0.0
    self._t, self._step = now, step
    return rate


# Module lists whose items the GAug statistics are named after: 'blocks/3' -> block3, Swin's
# 'layers/1/blocks/0' -> stage1_block0.
_PLACES = {'blocks': 'block', 'layers': 'stage'}


def gaug_scalars(intermediates: nnx.State) -> dict:
  """Per-block mean GAug variance and alpha, from what the attention layers of any family sowed."""
  out = {}

  def walk(node: dict, keys: tuple):
    for k, v in node.items():
      if k in ('gaug_var', 'gaug_alpha'):
        place = '_'.join(f'{_PLACES[p]}{i}' for p, i in zip(keys, keys[1:]) if p in _PLACES)
        out[f'{k}/{place}'] = jnp.mean(jnp.stack(v))
      elif isinstance(v, dict):
        walk(v, keys + (str(k),))

  walk(nnx.to_pure_dict(intermediates), ())
  return out


def eval_result_name(step: int) -> str:
  """The file in the workdir that holds an evaluation's full result (JSON)."""
  return f'eval_step{step}.json'


def last_logged(workdir, step: int) -> dict:
  """The scalars logged at `step` (the final metrics of a finished run), {} if none were."""
  rows = [r for r in metrics.read_metrics(workdir) if r['step'] == step]
  return {k: v for k, v in rows[-1].items() if k != 'step'} if rows else {}


def host_int(x) -> int:
  return int(np.asarray(jax.device_get(x)))


class Profiler:
  """A jax.profiler trace of steps [start, stop) into WORKDIR/plugins/profile/<run>/ (TensorBoard's
  Profile tab: `tensorboard --logdir WORKDIR`). Traced into a local folder, then copied, so a gs://
  workdir works too."""

  def __init__(self, steps, workdir):
    self.steps = tuple(steps)
    self._workdir = paths.path(workdir)
    self._local = None

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      self._local = tempfile.mkdtemp(prefix='locatvit_profile_')
      jax.profiler.start_trace(self._local)

  def after(self, step: int, state) -> None:
    if self._local is not None and step == self.steps[1] - 1:
      jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
      self.close()

  def close(self) -> None:
    """Ends a trace still running (the loop ended before `stop`) and copies it into the workdir."""
    if self._local is None:
      return
    jax.profiler.stop_trace()
    local = pathlib.Path(self._local)
    for f in local.rglob('*'):
      if f.is_file():
        paths.write_bytes(self._workdir / f.relative_to(local).as_posix(), f.read_bytes())
    shutil.rmtree(local)
    self._local = None
    logging.info('Profile from step %d written to %s/plugins/profile.', self.steps[0], self._workdir)


# -- the loop ------------------------------------------------------------------------------------
def train_loop(*, state, start_step: int, total_steps: int, step_fn, evaluate_fn, data_iter,
               ckpt: checkpoint.TrainCheckpointer, record, progress, workdir, config, evaluators=None):
  """The loop both trainers share: step, log, evaluate, checkpoint, stop on preemption.

  step_fn(state) -> (state, device scalars, host scalars): one update on the next batch.
  evaluate_fn(state, step) -> scalars to log (e.g. eval_top1 or miou).
  evaluators (optional, an evaluators.Runner): config.evals, run at each evaluator's own steps.
  `record` and `progress` (JSON-able dicts) are stored with every checkpoint; evaluate_fn may
  update `progress` in place. Uses config.log_every, eval_every (0: at the end only),
  checkpoint_every and batch_size.
  Returns (state, the scalars of the last logged step).
  """
  run_info.write(config, workdir)
  writer = metrics.MetricWriter(workdir)
  profiler = Profiler(config.get('profile_steps') or (), workdir)
  progress_line = metrics.ProgressLine(total_steps)
  throughput = Throughput(config.batch_size)
  guard = PreemptionGuard(ckpt)
  scalars = {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      profiler.before(step)
      state, device_scalars, host_scalars = step_fn(state)
      profiler.after(step, state)
      last = step == total_steps
      eval_due = last or (config.eval_every and step % config.eval_every == 0)
      save_due = last or step % config.checkpoint_every == 0
      evals_due = bool(evaluators and evaluators.due(step))
      if step % config.log_every == 0 or eval_due or evals_due or save_due or step == start_step + 1:
        scalars = fetch_scalars(device_scalars)
        check_finite(scalars, step)  # before saving: never checkpoint a diverged state
        scalars.update(host_scalars, img_per_s=throughput(step))
        if eval_due:
          scalars.update(evaluate_fn(state, step))
        if evals_due:
          scalars.update(evaluators(state, step))
        writer.write(step, scalars)
        progress_line.update(step, scalars)
      ckpt.save(step, state, data_iter, record, progress, force=last)
      if guard.should_stop(step):
        ckpt.save(step, state, data_iter, record, progress, force=True)
        ckpt.wait()
        logging.warning('Stopped at step %d after SIGTERM; rerun the same command to resume.', step)
        sys.exit(143)
  finally:
    profiler.close()
    ckpt.wait()
    guard.close()
    writer.close()
    progress_line.close()
  return state, scalars
