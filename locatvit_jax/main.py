"""Entry point for every job: python -m locatvit_jax.main --config=configs/vit_b.py --workdir=DIR.

`--config` is an ml_collections config file (`configs/NAME.py[:ARG]`; override any field with
`--config.a.b=value`). `config.task` picks the job. On Cloud TPU, SLURM, Open MPI and Kubernetes,
`jax.distributed.initialize()` finds its peers by itself; elsewhere pass --coordinator_address,
--num_processes and --process_id, or run a single process.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Job configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, logs, exports.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for clusters '
                                   'that JAX does not detect (e.g. several processes on one machine).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
  """Multi-controller JAX: explicit peers, else cluster auto-detection, else one process."""
  import jax
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if 'coordinator_address' not in str(e):
      raise
    logging.info('No cluster detected: running as a single process.')


def run(config, workdir: str):
  """Dispatches on config.task; returns the job's final metrics."""
  if config.task == 'classification':
    from locatvit_jax.train import classification
    return classification.train_and_evaluate(config, workdir)
  if config.task == 'segmentation':
    from locatvit_jax.train import segmentation
    return segmentation.train_and_evaluate(config, workdir)
  if config.task == 'demo':
    from locatvit_jax import demo
    return demo.run(config, workdir)
  raise ValueError(f"config.task={config.task!r}; expected 'classification', 'segmentation' or 'demo'")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  initialize_distributed()
  import jax
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    # Peers wait in collectives for this process; a normal exit would block in JAX's shutdown
    # barrier for minutes. Exiting hard lets launchers see the failure and stop the others.
    logging.exception('Process %d failed; exiting without waiting for the others.', jax.process_index())
    logging.flush()
    os._exit(1)


if __name__ == '__main__':  # Grain workers re-import __main__: nothing may run on import.
  app.run(main)
