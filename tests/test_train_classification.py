"""Classification pretraining end to end: mock ImageNet, sharding, resume, bad configs.

The multi-process run (jax.distributed on loopback) is in test_launch.py.
"""

import json
import os
import shutil
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
from locatvit_jax import checkpoint, loading, metrics, sharding
from locatvit_jax.configs import common
from locatvit_jax.train import classification
from tests.conftest import REPO, export_params, main_cmd, subprocess_env, tiny_classification_config, wait_for



def losses_by_step(workdir):
  return {r['step']: r['loss'] for r in metrics.read_metrics(workdir)}


def test_end_to_end_on_mock_imagenet(tmp_path):
  config = tiny_classification_config(total_steps=4, eval_every=4, checkpoint_every=2)
  config.data.num_classes = 1000
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = entry.run(config, str(tmp_path))
  rows = metrics.read_metrics(tmp_path)
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
  # Mixup groups are per device: groups of 2, the sharded run's 8 / (data 2 x fsdp 2), give both runs the same.
  config = tiny_classification_config(str(image_folder), total_steps=3, checkpoint_every=3, **{'mixup.group_size': 2})
  single = tmp_path / 'single'
  classification.train_and_evaluate(config, str(single), devices=jax.devices()[:1])
  # Every kind of parallelism at once: batch over data x fsdp, parameters over fsdp and tensor.
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  sharded = tmp_path / 'sharded'
  classification.train_and_evaluate(config, str(sharded))
  a, b = losses_by_step(single), losses_by_step(sharded)
  assert a.keys() == b.keys() == {1, 2, 3}
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5, atol=1e-6)
  pa = locatvit_jax.get_params(locatvit_jax.load(single / 'export'))
  pb = locatvit_jax.get_params(locatvit_jax.load(sharded / 'export'))
  # The full train state saved on 8 devices (data 2 x fsdp 2 x tensor 2) restores onto 1 device.
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  (sharded / 'export').rename(sharded / 'export_8dev')
  classification.train_and_evaluate(config, str(sharded), devices=jax.devices()[:1])
  pc = locatvit_jax.get_params(locatvit_jax.load(sharded / 'export'))
  jax.tree.map(np.testing.assert_array_equal, pb, pc)
  # Adam divides by sqrt(v): parameters with ~0 gradients amplify float32 noise, hence the atol.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), pa, pb)


def test_mixup_groups_are_the_authors_per_gpu_batches_and_never_span_devices():
  config = common.classification_config('vit_b16', 'locat')  # batch 1024
  assert classification.mixup_group(config, 4) == 256  # the authors' 4 GPUs x 256
  assert classification.mixup_group(config, 16) == 64  # a device's share
  config.grad_accum = 2
  assert classification.mixup_group(config, 4) == 128  # a device's share of a micro-batch


@pytest.mark.parametrize('override, message', [
    (dict(grad_accum=0), 'grad_accum=0; expected an integer >= 1'),
    (dict(checkpoint_every=0), 'checkpoint_every=0; expected an integer >= 1'),
    (dict(log_every=0), 'log_every=0; expected an integer >= 1'),
    ({'batch_size': 48, 'mixup.group_size': 4}, 'mixup.group_size=4 does not divide the 6 images each device'),
    ({'aug.eval_resize': 24}, r'aug.eval_resize=24 is smaller than img_size=32'),
    ({'data.eval_split': 'validation'}, r"split 'validation': .*/validation does not exist"),
])
def test_late_failures_fail_before_any_step_and_write_nothing(tmp_path, image_folder, override, message):
  t0 = time.monotonic()
  with pytest.raises(ValueError, match=message):
    entry.run(tiny_classification_config(str(image_folder), **override), str(tmp_path / 'w'))
  assert time.monotonic() - t0 < 30
  assert not (tmp_path / 'w').exists()


def test_bad_setting_is_one_error_line_from_the_command_line(tmp_path, image_folder):
  out = subprocess.run(main_cmd(tmp_path, image_folder, 2, ['--config.grad_accum=0']), cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == 'error: grad_accum=0; expected an integer >= 1'
  assert 'Traceback' not in out.stderr


def test_rerunning_a_finished_run_prints_its_metrics_without_training(tmp_path, image_folder):
  cmd = main_cmd(tmp_path, image_folder, 2)
  first = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  final = lambda out: {k: float(v) for k, v in json.loads(
      next(l for l in out.stdout.splitlines() if l.startswith('Final metrics: ')).removeprefix('Final metrics: ')).items()}
  parts = sorted((tmp_path / metrics.METRICS_DIR).iterdir())
  again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert final(again) == final(first) and 0.0 <= final(first)['eval_top1'] <= 1.0
  assert sorted((tmp_path / metrics.METRICS_DIR).iterdir()) == parts  # nothing trained or logged again


def test_export_best_remembers_the_best_top1_across_resumes(tmp_path, image_folder):
  config = tiny_classification_config(str(image_folder), total_steps=4, eval_every=2, checkpoint_every=2,
                                      export_best=True)
  classification.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  evals = {r['step']: r['eval_top1'] for r in metrics.read_metrics(tmp_path) if 'eval_top1' in r}
  progress = tmp_path / 'checkpoints' / '2' / 'progress' / 'metadata'
  assert json.loads(progress.read_text()) == {'best_eval_top1': evals[2]}
  # A resume from step 2 whose record holds a best no evaluation can beat keeps export_best as it is.
  progress.write_text(json.dumps({'best_eval_top1': 1.5}))
  shutil.rmtree(tmp_path / 'checkpoints' / '4')
  before = locatvit_jax.get_params(locatvit_jax.load(tmp_path / 'export_best'))
  classification.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  after = locatvit_jax.get_params(locatvit_jax.load(tmp_path / 'export_best'))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  final = tmp_path / 'checkpoints' / '4' / 'progress' / 'metadata'
  assert json.loads(final.read_text()) == {'best_eval_top1': 1.5}


@pytest.mark.parametrize('how', ['sigterm', 'kill9'])
def test_interrupted_run_resumes_exactly(tmp_path, image_folder, uninterrupted, how):
  cmd = main_cmd(tmp_path, image_folder, 8)
  proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if how == 'sigterm':
    wait_for(lambda: len(metrics.read_metrics(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
  else:
    wait_for(lambda: (tmp_path / 'checkpoints' / '4').is_dir(), proc)
    proc.kill()
    proc.wait()
  stopped_at = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert 2 <= stopped_at < 8
  subprocess.run(cmd, cwd=REPO, env=subprocess_env(), check=True, capture_output=True, text=True, timeout=600)
  # Every step's loss equals the uninterrupted run's: no batch skipped or repeated, same keys.
  ref, got = losses_by_step(uninterrupted), losses_by_step(tmp_path)
  assert set(got) == set(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               export_params(tmp_path), export_params(uninterrupted))


@pytest.mark.parametrize('override, message', [
    ('--config.batch_size=6', 'batch_size=6 is not divisible by data-parallel size 4'),
    ('--config.model.img_size=40', 'img_size=(40, 40) must be a multiple of patch_size=16'),
    ('--config.model.gaug_impl=magic', "gaug_impl='magic'"),
    ('--config.no_such_key=1', 'no_such_key'),
])
def test_bad_configs_fail_fast(tmp_path, image_folder, override, message):
  out = subprocess.run(main_cmd(tmp_path, image_folder, 2, [override, '--config.mesh.data=4']),
                       cwd=REPO, env=subprocess_env(devices=4), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert message in out.stderr + out.stdout
  assert not (tmp_path / 'checkpoints').exists()


# -- starting from a checkpoint: fine-tuning and evaluation ------------------------------------------
@pytest.fixture(scope='module')
def ten_class_export(tmp_path_factory):
  """A tiny LocAtViT with 10 classes: a checkpoint to fine-tune on the 4-class folder."""
  model = locatvit_jax.create_model('locatvit_ti16', num_classes=10, img_size=32, width=32, depth=2, num_heads=2,
                                    mlp_dim=64, seed=7)
  path = tmp_path_factory.mktemp('ten_class')
  checkpoint.save_params(path, locatvit_jax.get_params(model), model.cfg)
  return path


def test_init_starts_from_the_checkpoint_with_a_fresh_head(ten_class_export, image_folder):
  config = tiny_classification_config(str(image_folder), init=str(ten_class_export))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model_cfg, pretrained = classification.load_init(config, classification.check_config(config, mesh))
  setup = classification.build(config, model_cfg, mesh, 4, 1, pretrained)
  start = loading.flatten(jax.device_get(loading.params_dict(setup.init_state()['params'])))
  source = loading.flatten(locatvit_jax.get_params(locatvit_jax.load(ten_class_export)))
  assert start.keys() == source.keys() and start['head/kernel'].shape == (32, 4)
  for key in source:
    if not key.startswith('head/'):
      np.testing.assert_array_equal(start[key], source[key], err_msg=key)


def test_init_that_does_not_fit_the_config_is_one_clear_error(ten_class_export, image_folder, tmp_path):
  config = tiny_classification_config(str(image_folder), init=str(ten_class_export))
  config.model.update(dict(prr=False, depth=3))
  with pytest.raises(ValueError, match=r'holds a model with depth=2 \(config: 3\), prr=True \(config: False\)'):
    entry.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_fine_tune_from_the_command_line_learns_profiles_and_records_the_run(ten_class_export, image_folder, tmp_path):
  cmd = main_cmd(tmp_path, image_folder, 30, [f'--config.init={ten_class_export}', '--config.model.drop_path=0.0',
                                              '--config.mixup.mixup_alpha=0.0', '--config.mixup.cutmix_alpha=0.0',
                                              '--config.aug.randaug_num_ops=0', '--config.aug.erase_prob=0.0',
                                              '--config.optim.lr=3e-3', '--config.optim.lr_base_batch=8',
                                              '--config.checkpoint_every=30',
                                              '--config.profile_steps=(3, 5)'])
  out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = metrics.read_metrics(tmp_path)
  losses = [r['loss'] for r in rows]
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # measured: 1.31 -> 0.95
  assert rows[-1]['eval_top1'] >= 0.5  # 4 classes: chance is 0.25; measured 0.75
  # What the run recorded about itself.
  recorded = json.loads((tmp_path / 'run_config.json').read_text())
  assert recorded['init'] == str(ten_class_export) and recorded['total_steps'] == 30
  env = json.loads((tmp_path / 'run_environment.json').read_text())
  assert env['packages']['jax'] == jax.__version__ and env['devices'] == ['cpu:0'] and env['backend'] == 'cpu'
  # The profile of steps 3-4, readable as an XSpace with the host's trace in it.
  (trace,) = (tmp_path / 'plugins' / 'profile').glob('*/*.xplane.pb')
  planes = [p.name for p in jax.profiler.ProfileData.from_file(str(trace)).planes]
  assert any('host' in name.lower() or 'cpu' in name.lower() for name in planes), planes


def test_evaluate_the_authors_weights_on_an_imagenet_layout_folder(parity_dir, tmp_path):
  """eval_only with init = the authors' checkpoint (10 classes): top-1 over an ImageNet-layout folder
  whose labels are chosen from the model's own predictions (4 of 6 images in their predicted class)."""
  from PIL import Image
  from locatvit_jax.data import pipeline, sources
  rng = np.random.default_rng(0)
  probe = tmp_path / 'probe' / 'all'
  probe.mkdir(parents=True)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (230 + 10 * i, 260, 3), np.uint8)).save(probe / f'{i}.png')
  config = tiny_classification_config()
  config.model.img_size = 224
  config.aug.eval_resize = 248
  loader = pipeline.classification_loader(sources.image_folder_source(str(probe.parent)), train=False,
                                          global_batch_size=8, img_size=224, aug=config.aug, seed=0, worker_count=0)
  batch = next(iter(loader))
  predicted = np.argmax(np.asarray(locatvit_jax.load(parity_dir)(batch['image'][:6])), -1)
  for c in range(10):
    (tmp_path / 'imagenet' / 'val' / f'n{c:08d}').mkdir(parents=True)
  for i in range(6):
    label = predicted[i] if i < 4 else (predicted[i] + 1) % 10
    (probe / f'{i}.png').rename(tmp_path / 'imagenet' / 'val' / f'n{label:08d}' / f'{i}.png')

  cmd = [sys.executable, '-m', 'locatvit_jax.main', '--config=configs/vit_ti.py', f'--workdir={tmp_path / "w"}',
         f'--config.init={parity_dir}', '--config.eval_only=True', '--config.data.kind=folder',
         f'--config.data.root={tmp_path / "imagenet"}', '--config.data.num_classes=10', '--config.eval_batch_size=8',
         '--config.input.worker_count=0']
  out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  final = json.loads(next(l for l in out.stdout.splitlines() if l.startswith('Final metrics: '))[15:])
  assert final['eval_top1'] == pytest.approx(4 / 6) and final['eval_examples'] == 6
  assert json.loads((tmp_path / 'w' / 'eval_step0.json').read_text())['eval_top1'] == final['eval_top1']
  assert not (tmp_path / 'w' / 'checkpoints').exists()  # nothing trained
