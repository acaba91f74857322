"""Evaluation metrics that accumulate over batches and hosts, and evaluators picked by config.

`config.evals = {name: ConfigDict(type=..., every=STEPS, data=ConfigDict(...), ...)}`, in the
big_vision manner. `type` is one of TYPES; each type's module defines `class Evaluator` with
`__init__(self, name, cfg, mesh)` (which validates its own fields) and `run(model) -> dict` of
metrics named without prefix (callers log `f'{name}/{metric}'`). `every > 0` runs the evaluator
every `every` training steps and at the end of training; `every == 0` only at the end (and in the
standalone `task='evaluate'`).

An evaluator's `model` is any locatvit model in eval mode with
* `model.features(images) -> (B, h, w, C)`: dense patch features of the last block (no final norm,
  no PRR), what Hummingbird retrieves over;
* `model.pooled_features(images) -> (B, C)`: what the classifier head reads (after norm / PRR),
  what k-NN and linear probes use.
"""

from __future__ import annotations

import importlib
import json
import math
import time

import jax
import numpy as np
from absl import logging

from locatvit_jax import paths

EVALS_DIR = 'evals'  # WORKDIR/evals/{name}_step{N}.json: one file per evaluation

TYPES = {
    'knn': 'locatvit_jax.evaluators.knn',
    'linear_probe': 'locatvit_jax.evaluators.linear_probe',
    'hummingbird': 'locatvit_jax.evaluators.hummingbird',
}


def make_evaluator(name: str, cfg, mesh):
  """The Evaluator of `cfg.type`, its config validated (one ValueError naming the bad field)."""
  if not hasattr(cfg, 'get'):
    raise ValueError(f'config.evals.{name} is a {type(cfg).__name__}; expected a ConfigDict '
                     "with fields type, every, data")
  kind = cfg.get('type')
  if kind not in TYPES:
    raise ValueError(f'config.evals.{name}.type={kind!r}; expected one of {tuple(TYPES)}')
  every = cfg.get('every', 0)
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ValueError(f'config.evals.{name}.every={every!r}; expected an integer >= 0 '
                     '(0: only at the end)')
  module = importlib.import_module(TYPES[kind])
  return module.Evaluator(name, cfg, mesh)


def make_evaluators(evals_cfg, mesh) -> list:
  """Every evaluator of `config.evals` (in name order), all validated before any is run."""
  return [make_evaluator(name, evals_cfg[name], mesh) for name in sorted(evals_cfg or {})]


def due(evaluator, step: int, last_step: int) -> bool:
  """Whether `evaluator` runs after training step `step` of `last_step`."""
  return step == last_step or (evaluator.every > 0 and step % evaluator.every == 0)


def result_path(workdir, name: str, step: int):
  return paths.path(workdir) / EVALS_DIR / f'{name}_step{step}.json'


def _jsonable(value):
  """Arrays as lists; NaN and infinities as null (JSON has no such numbers)."""
  if isinstance(value, (np.ndarray, jax.Array)):
    return [_jsonable(v) for v in np.asarray(value).tolist()]
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


class Runner:
  """Runs evaluators on a model, logs their scalars as `{name}/{metric}`, writes a JSON per evaluation.

  Every process runs the evaluators (they are collective over the mesh); only process 0 writes.
  `to_model(state)` turns a trainer's state into the model that `__call__(state, step)` evaluates.
  """

  def __init__(self, evaluators, workdir, total_steps: int = 0, to_model=None):
    self.evaluators, self.workdir, self.total_steps, self.to_model = list(evaluators), workdir, total_steps, to_model

  def due(self, step: int) -> list:
    return [e for e in self.evaluators if due(e, step, self.total_steps)]

  def __call__(self, state, step: int) -> dict[str, float]:
    """The due evaluators' scalars after training step `step` ({} when none is due)."""
    todo = self.due(step)
    return self.evaluate(self.to_model(state), step, todo) if todo else {}

  def evaluate(self, model, step: int, evaluators=None) -> dict[str, float]:
    scalars = {}
    for e in self.evaluators if evaluators is None else evaluators:
      t0 = time.perf_counter()
      metrics = e.run(model)
      seconds = time.perf_counter() - t0
      logging.info('Evaluator %s at step %d (%.1f s): %s', e.name, step, seconds,
                   {k: v for k, v in metrics.items() if np.ndim(v) == 0})
      scalars.update({f'{e.name}/{k}': float(v) for k, v in metrics.items() if np.ndim(v) == 0})
      if jax.process_index() == 0:
        record = {'name': e.name, 'type': type(e).__module__.rsplit('.', 1)[-1], 'step': step,
                  'seconds': seconds, 'metrics': _jsonable(metrics)}
        paths.write_text(result_path(self.workdir, e.name, step), json.dumps(record, indent=1))
    return scalars
