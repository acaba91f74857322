"""Entry point for every job: python -m locatvit_jax.main --config=configs/vit_b.py --workdir=DIR.

Installed, the same command is `locatvit-train --config=configs/vit_b.py --workdir=DIR`.
`--config` is an ml_collections config file, `FILE.py[:ARG]`; `configs/NAME.py` names the
package's own configs (locatvit_jax/configs/) unless such a file exists where you run. Override
any field with `--config.a.b=value`. `config.task` picks the job. On Cloud TPU, SLURM, Open MPI
and Kubernetes, `jax.distributed.initialize()` finds its peers by itself; elsewhere pass
--coordinator_address, --num_processes and --process_id, or run a single process.

Bad settings and inputs (ValueError, FileNotFoundError) end the run with one `error:` line and
exit status 2; the traceback is logged at debug level (`--verbosity=1`).

On a CPU backend the command re-executes itself once, before JAX starts, under the fast CPU
environment of locatvit_jax/cpu_env.py (XLA flags, an allocator that keeps freed pages);
LOCATVIT_FAST_CPU=0 runs it as started.
"""

import json
import os
import pathlib
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from locatvit_jax import cpu_env

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Job configuration file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, logs, exports.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for clusters '
                                   'that JAX does not detect (e.g. several processes on one machine).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
flags.mark_flags_as_required(['config', 'workdir'])


TASKS = ('classification', 'segmentation', 'demo', 'evaluate', 'dino')


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
  if config.task not in TASKS:
    raise ValueError(f'config.task={config.task!r}; expected one of {TASKS}')
  if config.task == 'classification':
    from locatvit_jax.train import classification
    return classification.train_and_evaluate(config, workdir)
  if config.task == 'segmentation':
    from locatvit_jax.train import segmentation
    return segmentation.train_and_evaluate(config, workdir)
  if config.task == 'demo':
    from locatvit_jax import demo
    return demo.run(config, workdir)
  if config.task == 'evaluate':
    from locatvit_jax.train import evaluate
    return evaluate.run(config, workdir)
  if config.task == 'dino':
    from locatvit_jax.train import dino
    return dino.train_and_evaluate(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  initialize_distributed()
  import jax
  from locatvit_jax.train.common import NonFiniteLossError
  try:
    result = run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    if jax.process_count() > 1:
      _exit_now(jax)
    logging.debug('%s', traceback.format_exc())
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  except NonFiniteLossError as e:  # the run diverged: its message says what was kept and what to try
    if jax.process_count() > 1:
      _exit_now(jax)
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    _exit_now(jax)
  if jax.process_index() == 0:
    print('Final metrics: ' + json.dumps(_jsonable(result)), flush=True)


def _exit_now(jax):
  # Peers wait in collectives for this process; a normal exit would block in JAX's shutdown
  # barrier for minutes. Exiting hard lets launchers see the failure and stop the others.
  logging.exception('Process %d failed; exiting without waiting for the others.', jax.process_index())
  logging.flush()
  os._exit(1)


def _jsonable(result) -> dict:
  """Scalars of a job's result (arrays such as per-class IoU are in the workdir's files)."""
  return {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str, type(None)))}


_PACKAGE_CONFIGS = pathlib.Path(__file__).parent / 'configs'


def resolve_config_arg(argv: list[str]) -> list[str]:
  """`--config=configs/NAME.py[:ARG]` -> the packaged config, unless that file exists here."""
  def resolve(value: str) -> str:
    file, sep, arg = value.partition(':')
    m = re.fullmatch(r'(?:\./)?configs/(\w+\.py)', file)
    if m and not os.path.exists(file) and (_PACKAGE_CONFIGS / m.group(1)).exists():
      return str(_PACKAGE_CONFIGS / m.group(1)) + sep + arg
    return value
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith('--config='):
      a = '--config=' + resolve(a[len('--config='):])
    elif a == '--config' and i + 1 < len(argv):
      out.append(a)
      i += 1
      a = resolve(argv[i])
    out.append(a)
    i += 1
  return out


def cli() -> None:
  """The `locatvit-train` console script (and `python -m locatvit_jax.main`)."""
  argv = resolve_config_arg(sys.argv)
  if any(a in ('-h', '--help') for a in argv[1:]):  # absl's own --help lists no flags of ours, exits 1
    packaged = sorted(p.name for p in _PACKAGE_CONFIGS.glob('*.py') if p.name not in ('__init__.py', 'common.py'))
    print(f'{__doc__.strip()}\n\nPackaged configs (--config=configs/NAME.py): {", ".join(packaged)}\n\n'
          f'Flags:\n{flags.FLAGS.module_help(sys.modules[__name__])}')
    sys.exit(0)
  cpu_env.reexec_if_cpu()  # before JAX initialises; LOCATVIT_FAST_CPU=0 keeps this process as it is
  app.run(main, argv=argv)


if __name__ == '__main__':  # Grain workers re-import __main__: nothing may run on import.
  cli()
