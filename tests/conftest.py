"""Shared test setup: 8 fake CPU devices, absl flags marked parsed, paths to the shared fixtures."""

import atexit
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

# Tiny models compile far more than they compute: XLA's lowest backend optimisation level compiles
# them faster (about 15% of a training test) and changes no result beyond float32 rounding. The
# subprocesses tests start use it too, so in-process and subprocess results stay comparable.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
# Must be set before JAX initialises its backends; tests that need one device use a sub-mesh.
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}')
# One XLA compilation cache for the session, inherited by the subprocesses tests start: the suite
# compiles the same tiny models' steps many times (new closures, new processes), and on two cores
# compilation is most of a tiny run. Entries are keyed by the HLO, flags and devices, so a hit is exact.
# pytest-xdist's workers inherit the controller's folder; only its creator removes it.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='locatvit_tests_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain workers and absl-using modules read flags; pytest never calls app.run().
flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def shared_fixture(*parts: str) -> pathlib.Path:
  """A folder of ../shared (the authors' reference outputs). A clone without it skips the tests
  that need it; CI (CI=true), which always has it, fails instead of skipping silently."""
  d = SHARED.joinpath(*parts)
  if not d.is_dir():
    message = f'{d} is missing: the parity tests need ../shared beside the checkout'
    if os.environ.get('CI', '').lower() in ('1', 'true'):
      pytest.fail(message)
    pytest.skip(message)
  return d


@pytest.fixture(scope='session')
def parity_dir() -> pathlib.Path:
  return shared_fixture('parity', 'locatvit_tiny_random')


def tiny_classification_config(data_root: str | None = None, **overrides):
  """configs/vit_ti.py shrunk to seconds: width 32, depth 2, 32 px, batch 8, a few steps."""
  from locatvit_jax.configs import common
  c = common.classification_config('vit_ti16', 'locat')
  c.model.update(dict(img_size=32, width=32, depth=2, num_heads=2, mlp_dim=64, drop_path=0.1))
  c.aug.eval_resize = 36
  if data_root:
    c.data.update(dict(kind='folder', root=data_root, num_classes=4))  # eval split: the folder default, val
  c.input.worker_count = 0
  c.batch_size = c.eval_batch_size = 8
  c.total_steps, c.warmup_steps = 6, 2
  c.optim.update(dict(lr=1e-3, lr_base_batch=8, warmup_init_lr=0.0, end_lr=0.0))
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
  c.export_best = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def make_image_folder(root: pathlib.Path, *, classes=4, per_class=6, size=40, splits=('train', 'val')):
  """A tiny ImageNet-style folder: root/SPLIT/CLASS/*.png; each class has its own colour."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in splits:
    for c in range(classes):
      d = root / split / f'class_{c}'
      d.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        base = np.array([60 * c, 255 - 60 * c, 120], np.float64)
        img = np.clip(base + rng.normal(0, 40, (size, size + 8 * (i % 3), 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f'{i}.png')
  return root


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory) -> pathlib.Path:
  return make_image_folder(tmp_path_factory.mktemp('folder_data'))


# -- the entry point in a subprocess, as users run it --------------------------------------------------
TINY_MODEL_FLAGS = [
    '--config.model.img_size=32', '--config.model.width=32', '--config.model.depth=2',
    '--config.model.num_heads=2', '--config.model.mlp_dim=64', '--config.aug.eval_resize=36',
    '--config.input.worker_count=0', '--config.batch_size=8', '--config.eval_batch_size=8',
    '--config.log_every=1', '--config.eval_every=0', '--config.export_best=False',
]


def main_cmd(workdir, data_root, steps, extra=()):
  return [sys.executable, '-m', 'locatvit_jax.main', '--config=configs/vit_ti.py', f'--workdir={workdir}',
          *TINY_MODEL_FLAGS, '--config.data.kind=folder', f'--config.data.root={data_root}',
          '--config.data.num_classes=4', f'--config.total_steps={steps}',
          '--config.warmup_steps=2', '--config.checkpoint_every=2', *extra]


def subprocess_env(devices=1):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}',
             PYTHONUNBUFFERED='1')
  env.pop('JAX_PLATFORMS', None)
  return env


def wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'process exited early with {proc.returncode}:\n{proc.stdout.read()[-3000:]}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError('timed out')
    time.sleep(0.2)


@pytest.fixture(scope='session')
def uninterrupted(tmp_path_factory, image_folder):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  subprocess.run(main_cmd(workdir, image_folder, 8), cwd=REPO, env=subprocess_env(), check=True,
                 capture_output=True, text=True, timeout=600)
  return workdir


@pytest.fixture(scope='session')
def good_checkpoints(tmp_path_factory):
  """A tiny params export and training workdir (tests/test_loading.py) to damage copies of."""
  from tests.test_loading import write_good_checkpoints
  return write_good_checkpoints(tmp_path_factory.mktemp('good'))


def export_params(workdir):
  import locatvit_jax
  return locatvit_jax.get_params(locatvit_jax.load(f'{workdir}/export'))


# -- a local GCS API for the gs:// tests -------------------------------------------------------------
GCS_BUCKET = 'locatvit-test'


@pytest.fixture(scope='session')
def gcs_emulator(tmp_path_factory):
  """A GCS emulator on loopback (tests/gcs_emulator.py) for the whole session; gcsfs and tensorstore,
  here and in the subprocesses tests start, are pointed at it through the environment."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  # A file, not a pipe: the emulator logs every dropped connection, and a full pipe would stall it.
  log = tmp_path_factory.mktemp('gcs_emulator') / 'log.txt'
  with open(log, 'wb') as log_file:
    proc = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'gcs_emulator.py'), 'start', '--host=127.0.0.1',
                             f'--port={port}', '--in-memory', f'--default-bucket={GCS_BUCKET}', '-q'],
                            stdout=log_file, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f'the GCS emulator did not start: {log.read_text()[-2000:]}')
      time.sleep(0.1)
  url = f'http://127.0.0.1:{port}'
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         # gcsfs otherwise probes the bucket type over gRPC, 60 s per call against an emulator.
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
         # tensorstore sends this as its bearer token instead of searching for credentials.
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield url
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.terminate()
  proc.wait(timeout=30)


@pytest.fixture
def gcs_dir(gcs_emulator, request) -> str:
  """A fresh gs:// folder for one test."""
  return f'gs://{GCS_BUCKET}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}'
