"""What a job records about itself in its workdir, so that a result can be traced to what made it.

    WORKDIR/run_config.json       the resolved config (every field, overrides applied)
    WORKDIR/run_environment.json  command line, time, Python, package versions, backend and devices

Written by process 0 at every start (a resume rewrites them with its own).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import sys

import jax

from locatvit_jax import paths

CONFIG_FILE = 'run_config.json'
ENVIRONMENT_FILE = 'run_environment.json'
PACKAGES = ('locatvit_jax', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorstore', 'grain',
            'tensorflow-datasets', 'ml-collections', 'numpy', 'etils', 'gcsfs')


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None  # e.g. locatvit_jax run from a clone that was not pip-installed


def environment() -> dict:
  return {
      'argv': sys.argv,
      'started_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'python': sys.version.split()[0],
      'platform': platform.platform(),
      'packages': {p: _version(p) for p in PACKAGES},
      'backend': jax.default_backend(),
      'process_count': jax.process_count(),
      'devices': [str(d) for d in jax.devices()],
  }


def write(config, workdir) -> None:
  if jax.process_index() != 0:
    return
  paths.write_text(paths.path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))
  paths.write_text(paths.path(workdir) / ENVIRONMENT_FILE, json.dumps(environment(), indent=2))
