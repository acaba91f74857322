"""Every Orbax call of the project lives here.

Two on-disk layouts:

* Params export (what `locatvit_jax.load` and other JAX code read)::

    DIR/params/              Orbax StandardCheckpointer tree: a plain nested dict of arrays
    DIR/model_config.json    ViTConfig fields
    DIR/class_names.txt      one class name per line, in label order (when the training data named them)

  The arrays are written from host memory (gathered from every device and process first), so
  any JAX program on any number of devices reads them with Orbax alone, as numpy arrays:
  `ocp.StandardCheckpointer().restore(os.path.abspath('DIR/params'))` (or a gs:// URL).

* Training checkpoints (written by the trainers through `TrainCheckpointer`)::

    WORKDIR/checkpoints/<step>/state         {'params', 'opt_state', 'step', ...}, sharded arrays
    WORKDIR/checkpoints/<step>/data_iter     the Grain iterator position of this process
    WORKDIR/checkpoints/<step>/model_config  ViTConfig fields (JSON)
    WORKDIR/checkpoints/<step>/progress      the loop's own state, e.g. the best eval top-1 (JSON)
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from locatvit_jax import paths

PARAMS_DIR = 'params'
CONFIG_FILE = 'model_config.json'
CLASS_NAMES_FILE = 'class_names.txt'
CHECKPOINTS_DIR = 'checkpoints'


# -- params export ---------------------------------------------------------------------------------
def is_params_export(path) -> bool:
  p = paths.path(path)
  return (p / PARAMS_DIR).is_dir() and (p / CONFIG_FILE).exists()


def save_params(path, params: dict, model_cfg, class_names: Sequence[str] | None = None) -> None:
  """Writes the params export (blocking; every process calls it, process 0 writes the files).

  `class_names` (label order), when given, goes to class_names.txt, where `locatvit_jax.predict` reads it.

  Sharded arrays are gathered to host numpy first: an export records no device layout, so a
  checkpoint from a pod restores without a target on a laptop.
  """
  p = paths.path(path)
  host_params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(p / PARAMS_DIR, host_params, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_text(p / CONFIG_FILE, model_cfg.to_json())
    if class_names is not None:
      paths.write_text(p / CLASS_NAMES_FILE, ''.join(f'{name}\n' for name in class_names))


def restore_params(path) -> tuple[dict, dict]:
  """(params as numpy nested dict, model config dict) from a params export or training checkpoints."""
  p = paths.path(path)
  if is_params_export(p):
    meta = ocp.StandardCheckpointer().metadata(p / PARAMS_DIR).item_metadata
    params = ocp.StandardCheckpointer().restore(p / PARAMS_DIR, _numpy_targets(meta))
    return params, json.loads(paths.read_text(p / CONFIG_FILE))
  step_dir = find_training_step(p)
  if step_dir is None:
    raise ValueError(f'{path}: neither a params export ({PARAMS_DIR}/ + {CONFIG_FILE}) nor training checkpoints')
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(step_dir / 'state').item_metadata
  state = ckptr.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
      item={'params': _numpy_targets(meta['params'])},
      restore_args={'params': jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), _numpy_targets(meta['params']))},
      partial_restore=True))
  cfg = json.loads(paths.read_text(step_dir / 'model_config' / 'metadata'))
  return _unwrap_variables(state['params']), cfg


def _unwrap_variables(tree):
  """Trainers save nnx.State, whose Variables Orbax stores as {'value': array}: drop that level."""
  if isinstance(tree, dict):
    if set(tree) == {'value'} and not isinstance(tree['value'], dict):
      return tree['value']
    return {k: _unwrap_variables(v) for k, v in tree.items()}
  return tree


def _numpy_targets(meta_tree) -> Any:
  """Restore targets that make Orbax return host numpy arrays (no devices, no sharding needed)."""
  return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta_tree, is_leaf=lambda m: hasattr(m, 'shape'))


def find_training_step(path) -> epath.Path | None:
  """The newest complete step directory under a workdir, its checkpoints/ or a step dir itself."""
  p = paths.path(path)
  if (p / 'state').is_dir() and (p / 'model_config').is_dir():
    return p
  for root in (p / CHECKPOINTS_DIR, p):
    if root.is_dir():
      steps = ocp.utils.checkpoint_steps(root)
      if steps:
        return root / str(max(steps))
  return None


# -- training checkpoints ------------------------------------------------------------------------
class TrainCheckpointer:
  """Async CheckpointManager over WORKDIR/checkpoints: train state, Grain iterator, model config, progress.

  Saves every `save_every` steps keeping the newest `max_to_keep`; `save(..., force=True)` saves
  now (end of training, preemption). Restoring takes an abstract state whose leaves carry the
  target shardings, so a checkpoint written on one mesh restores onto any other.
  """

  def __init__(self, workdir, *, save_every: int, max_to_keep: int = 3, use_async: bool = True):
    import grain  # the Grain handler registers its Orbax args on import

    self._grain = grain
    self.directory = paths.path(workdir) / CHECKPOINTS_DIR
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=use_async, cleanup_tmp_directories=True),
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'data_iter': grain.checkpoint.CheckpointHandler(),
            'model_config': ocp.JsonCheckpointHandler(),
            'progress': ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, record: dict, progress: dict, *, force: bool = False) -> bool:
    """Saves at multiples of save_every, or now with force; returns whether it saved.

    `record` (JSON-able) describes the model: ViTConfig fields for pretraining runs. `progress`
    (JSON-able) is what the loop must carry across a resume besides the state (the best top-1).
    """
    if not force and step % self.save_every:
      return False
    if step == self.manager.latest_step():
      return False
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=self._grain.checkpoint.CheckpointSave(data_iter),
        model_config=ocp.args.JsonSave(record),
        progress=ocp.args.JsonSave(progress)))

  def restore(self, step: int, abstract_state, data_iter) -> tuple[Any, dict]:
    """(state on the shardings of `abstract_state`, progress); `data_iter` is repositioned."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=self._grain.checkpoint.CheckpointRestore(data_iter),
        progress=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['progress'])

  def read_state(self, step: int) -> dict:
    """The saved train state as written (for inspection and tests; no target shardings)."""
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any was told of a preemption (multi-host sync point)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
