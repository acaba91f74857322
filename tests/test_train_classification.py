"""Classification pretraining end to end: mock ImageNet, sharding, resume, bad configs.

The multi-process run (jax.distributed on loopback) is in test_launch.py.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import locatvit_jax
from locatvit_jax import main as entry
from locatvit_jax.train import classification
from tests.conftest import REPO, tiny_classification_config

TINY_MODEL_FLAGS = [
    '--config.model.img_size=32', '--config.model.width=32', '--config.model.depth=2',
    '--config.model.num_heads=2', '--config.model.mlp_dim=64', '--config.aug.eval_resize=36',
    '--config.input.worker_count=0', '--config.batch_size=8', '--config.eval_batch_size=8',
    '--config.log_every=1', '--config.eval_every=0', '--config.export_best=False',
]


def read_jsonl(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def losses_by_step(workdir):
  return {r['step']: r['loss'] for r in read_jsonl(workdir)}


def test_end_to_end_on_mock_imagenet(tmp_path):
  config = tiny_classification_config(total_steps=4, eval_every=4, checkpoint_every=2)
  config.data.num_classes = 1000
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = entry.run(config, str(tmp_path))
  rows = read_jsonl(tmp_path)
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert {'step', 'loss', 'lr', 'img_per_s', 'grad_norm', 'gaug_var/block0', 'gaug_alpha/block1'} <= set(rows[0])
  assert 'eval_top1' in rows[-1] and 0.0 <= result['eval_top1'] <= 1.0
  lrs = [r['lr'] for r in rows]  # the rate each step used: warmup over 2 steps, then linear decay
  assert lrs[0] < lrs[1] < lrs[2] > lrs[3]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert list(tmp_path.glob('events.out.tfevents.*'))
  model = locatvit_jax.load(tmp_path / 'export')
  assert model.cfg.width == 32 and model.cfg.num_classes == 1000
  from_ckpt = locatvit_jax.load(tmp_path)  # the newest training checkpoint, params only
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(from_ckpt(x)))


def test_sharded_training_matches_single_device(tmp_path, image_folder):
  config = tiny_classification_config(str(image_folder), total_steps=3, checkpoint_every=3)
  single = tmp_path / 'single'
  classification.train_and_evaluate(config, str(single), devices=jax.devices()[:1])
  config.mesh.update(dict(data=2, fsdp=4))
  sharded = tmp_path / 'sharded'
  classification.train_and_evaluate(config, str(sharded))
  a, b = losses_by_step(single), losses_by_step(sharded)
  assert a.keys() == b.keys() == {1, 2, 3}
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5, atol=1e-6)
  pa = locatvit_jax.get_params(locatvit_jax.load(single / 'export'))
  pb = locatvit_jax.get_params(locatvit_jax.load(sharded / 'export'))
  # The full train state saved on 8 devices (data 2 x fsdp 4) restores onto 1 device.
  config.mesh.update(dict(data=-1, fsdp=1))
  (sharded / 'export').rename(sharded / 'export_8dev')
  classification.train_and_evaluate(config, str(sharded), devices=jax.devices()[:1])
  pc = locatvit_jax.get_params(locatvit_jax.load(sharded / 'export'))
  jax.tree.map(np.testing.assert_array_equal, pb, pc)
  # Adam divides by sqrt(v): parameters with ~0 gradients amplify float32 noise, hence the atol.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), pa, pb)


def _main_cmd(workdir, data_root, steps, extra=()):
  return [sys.executable, '-m', 'locatvit_jax.main', '--config=configs/vit_ti.py', f'--workdir={workdir}',
          *TINY_MODEL_FLAGS, '--config.data.kind=folder', f'--config.data.root={data_root}',
          '--config.data.eval_split=val', '--config.data.num_classes=4', f'--config.total_steps={steps}',
          '--config.warmup_steps=2', '--config.checkpoint_every=2', *extra]


def _env(devices=1):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', PYTHONUNBUFFERED='1')
  env.pop('JAX_PLATFORMS', None)
  return env


def _wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'process exited early with {proc.returncode}:\n{proc.stdout.read()[-3000:]}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError('timed out')
    time.sleep(0.2)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, image_folder):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  subprocess.run(_main_cmd(workdir, image_folder, 8), cwd=REPO, env=_env(), check=True,
                 capture_output=True, text=True, timeout=600)
  return workdir


def _params(workdir):
  return locatvit_jax.get_params(locatvit_jax.load(pathlib.Path(workdir) / 'export'))


@pytest.mark.parametrize('how', ['sigterm', 'kill9'])
def test_interrupted_run_resumes_exactly(tmp_path, image_folder, uninterrupted, how):
  cmd = _main_cmd(tmp_path, image_folder, 8)
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if how == 'sigterm':
    _wait_for(lambda: (tmp_path / 'metrics.jsonl').exists() and len(read_jsonl(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
  else:
    _wait_for(lambda: (tmp_path / 'checkpoints' / '4').is_dir(), proc)
    proc.kill()
    proc.wait()
  stopped_at = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert 2 <= stopped_at < 8
  subprocess.run(cmd, cwd=REPO, env=_env(), check=True, capture_output=True, text=True, timeout=600)
  # Every step's loss equals the uninterrupted run's: no batch skipped or repeated, same keys.
  ref, got = losses_by_step(uninterrupted), losses_by_step(tmp_path)
  assert set(got) == set(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               _params(tmp_path), _params(uninterrupted))


@pytest.mark.parametrize('override, message', [
    ('--config.batch_size=6', 'batch_size=6 is not divisible by data-parallel size 4'),
    ('--config.model.img_size=40', 'img_size=(40, 40) must be a multiple of patch_size=16'),
    ('--config.model.gaug_impl=magic', "gaug_impl='magic'"),
    ('--config.no_such_key=1', 'no_such_key'),
])
def test_bad_configs_fail_fast(tmp_path, image_folder, override, message):
  out = subprocess.run(_main_cmd(tmp_path, image_folder, 2, [override, '--config.mesh.data=4']),
                       cwd=REPO, env=_env(devices=4), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert message in out.stderr + out.stdout
  assert not (tmp_path / 'checkpoints').exists()
