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
    WORKDIR/checkpoints/<step>/model_config  the model record (JSON): ViTConfig fields, or the trainer's own
                                             (segmentation: train/segmentation.head_config)
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


def holds_model(path) -> bool:
  """Whether `path` is, or is meant to be, one of our checkpoints: a params export (complete or not)
  or a workdir, checkpoints/ or step folder with training checkpoints."""
  p = paths.path(path)
  return _export_like(p) or find_training_step(p) is not None


def read_model_record(path) -> tuple[dict, epath.Path]:
  """(the model record, the file it is in) of the params export at `path`, else of the newest training
  step under it. The record is ViTConfig fields, or what a trainer records about its model instead
  (segmentation: the head and its backbone)."""
  p = paths.path(path)
  if _export_like(p):
    for part in (PARAMS_DIR, CONFIG_FILE):
      if not (p / part).exists():
        raise ValueError(f'{p}: an incomplete params export, {part} is missing; '
                         f'expected {PARAMS_DIR}/ and {CONFIG_FILE}')
    file = p / CONFIG_FILE
  else:
    file = _training_step(p) / 'model_config' / 'metadata'
    if not file.exists():
      raise ValueError(f'{file}: no such file; this training checkpoint is incomplete')
  return read_json(file), file


def read_json(file) -> dict:
  """A JSON object from `file`; anything else is a ValueError naming the file."""
  try:
    record = json.loads(paths.read_text(file))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{file}: not valid JSON ({e})') from e
  if not isinstance(record, dict):
    raise ValueError(f'{file}: holds a JSON {type(record).__name__}; expected an object')
  return record


def restore_params(path) -> dict:
  """Params (host numpy nested dict) of the params export at `path`, else of the newest training step
  under it. An array folder that Orbax cannot read is a ValueError naming it."""
  p = paths.path(path)
  export = is_params_export(p)
  folder = p / PARAMS_DIR if export else _training_step(p) / 'state'
  ckptr = ocp.StandardCheckpointer() if export else ocp.PyTreeCheckpointer()
  try:
    meta = ckptr.metadata(folder).item_metadata
    if meta is None:  # Orbax's answer (and a logged warning) for a missing or garbled _METADATA or manifest
      raise FileNotFoundError('no metadata that Orbax can read')
    if export:
      return ckptr.restore(folder, _numpy_targets(meta))
    targets = _numpy_targets(meta['params'])
    state = ckptr.restore(folder, args=ocp.args.PyTreeRestore(
        item={'params': targets},
        restore_args={'params': jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), targets)},
        partial_restore=True))
  except (OSError, ValueError) as e:  # what Orbax and tensorstore raise for missing, cut or garbled files
    raise ValueError(f'{folder}: a damaged or incomplete Orbax checkpoint ({first_line(e)})') from e
  return _unwrap_variables(state['params'])


def first_line(e: Exception) -> str:
  """The first line of an error's message, which libraries (torch, Orbax) run over many."""
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def _export_like(p) -> bool:
  """A params export, or what is left of one (either part alone)."""
  return (p / PARAMS_DIR).is_dir() or (p / CONFIG_FILE).exists()


def _training_step(p) -> epath.Path:
  step_dir = find_training_step(p)
  if step_dir is None:
    raise ValueError(f'{p}: neither a params export ({PARAMS_DIR}/ + {CONFIG_FILE}) nor training checkpoints')
  return step_dir


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
