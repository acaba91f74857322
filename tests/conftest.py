"""Shared test setup: 8 fake CPU devices, absl flags marked parsed, paths to the shared fixtures."""

import os
import pathlib
import sys

# Must be set before JAX initialises its backends; tests that need one device use a sub-mesh.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain workers and absl-using modules read flags; pytest never calls app.run().
flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


@pytest.fixture(scope='session')
def parity_dir() -> pathlib.Path:
  d = SHARED / 'parity' / 'locatvit_tiny_random'
  if not d.is_dir():
    pytest.fail(f'{d} is missing: CI runs with ../shared beside the checkout')
  return d
