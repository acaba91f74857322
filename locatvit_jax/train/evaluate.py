"""config.task='evaluate': the evaluators of config.evals on any checkpoint, without training.

`config.init` is anything `locatvit_jax.load` reads (our exports and training workdirs, the authors'
.safetensors / .pth / Hugging Face folders); `config.prr`, `config.ema`, `config.trust_pickle` and
`config.dtype` are load()'s flags for what the files cannot tell. Every evaluator is validated and
its data opened before the checkpoint is read, so a bad config costs nothing.

Writes WORKDIR/evals/{name}_step0.json (every metric, arrays included), one metrics row at step 0
(metrics.jsonl and TensorBoard: `{name}/{metric}`), run_config.json and run_environment.json;
returns the scalars, which main.py prints as the final metrics. Multi-host: every process loads the
model and runs the evaluators, process 0 writes.
"""

from __future__ import annotations

import jax
from absl import logging
from flax import nnx

from locatvit_jax import evaluators, metrics, paths, run_info, sharding
from locatvit_jax.train import common


def check_config(config) -> None:
  if not config.get('init'):
    raise ValueError('config.init is empty; expected a checkpoint to evaluate (anything locatvit_jax.load '
                     'reads: our export or workdir, the authors\' .safetensors, .pth or Hugging Face folder)')
  if not config.get('evals'):
    raise ValueError("config.evals is empty; expected at least one evaluator, e.g. "
                     "configs/evaluate.py:knn,linear_probe")


def load_flags(config) -> dict:
  """load()'s keyword arguments from config.prr, ema, trust_pickle and dtype (unset: as the files say)."""
  flags = dict(ema=bool(config.get('ema', False)), trust_pickle=bool(config.get('trust_pickle', False)))
  for field in ('prr', 'dtype'):
    if config.get(field) is not None:
      flags[field] = config[field]
  return flags


def on_mesh(model, mesh):
  """`model` with its parameters sharded by the mesh's rules and everything else replicated."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, sharding.tree_shardings(params, mesh))
  rest = jax.device_put(rest, sharding.replicated(mesh))
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  return model


def run(config, workdir: str, devices=None) -> dict:
  """Evaluates config.init with config.evals; returns {'{name}/{metric}': value, ..., 'checkpoint': path}."""
  check_config(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  evals = evaluators.make_evaluators(config.evals, mesh)
  model = on_mesh(common.load_model(config.init, 'config.init=', **load_flags(config)), mesh)
  workdir = paths.path(workdir)
  run_info.write(config, workdir)
  step = 0  # nothing is trained: every result is of the checkpoint as loaded
  scalars = evaluators.Runner(evals, workdir).evaluate(model, step)
  with metrics.MetricWriter(workdir) as writer:
    writer.write(step, scalars)
  logging.info('Evaluated %s: %s', config.init, scalars)
  return {**scalars, 'checkpoint': str(config.init)}
