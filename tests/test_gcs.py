"""gs:// end to end, against a local GCS API (tests/gcs_emulator.py), as runs on a Cloud TPU pod use it.

Checkpoints go through Orbax/tensorstore, everything else through locatvit_jax.paths (gcsfs): data,
metrics, TensorBoard events, exports, `load()`, `convert`, eval JSON and pictures.
"""

import json
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import locatvit_jax
from locatvit_jax import checkpoint, metrics, paths
from locatvit_jax.configs import common
from locatvit_jax.train import segmentation
from tests.conftest import REPO, export_params, main_cmd, subprocess_env, wait_for
from tests.test_seg_data import write_ade20k


def upload(local, url: str) -> str:
  for f in local.rglob('*'):
    if f.is_file():
      paths.write_bytes(f'{url}/{f.relative_to(local)}', f.read_bytes())
  return url


def test_path_layer_round_trip_and_no_append(gcs_dir):
  p = paths.write_text(f'{gcs_dir}/a/b.txt', 'hi')  # no folder to create first
  assert str(p) == f'{gcs_dir}/a/b.txt' and p.read_text() == 'hi'
  writer = metrics.MetricWriter(gcs_dir, rows_per_part=2)
  for step in (1, 2, 3):
    writer.write(step, {'loss': float(step)})
    # Every row is in GCS as soon as it is written: no append, no buffered flush.
    assert [r['step'] for r in metrics.read_metrics(gcs_dir)] == list(range(1, step + 1))
  assert len(list(paths.path(gcs_dir).glob('events.out.tfevents.*'))) == 2


def test_classification_on_gs_resumes_after_sigterm_to_the_uninterrupted_result(gcs_dir, image_folder,
                                                                                uninterrupted):
  """Data, workdir and everything written on gs://; SIGTERM mid-run, rerun, same losses and params."""
  data = upload(image_folder, f'{gcs_dir}/data')
  workdir = f'{gcs_dir}/run'
  cmd = main_cmd(workdir, data, 8)
  proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  wait_for(lambda: len(metrics.read_metrics(workdir)) >= 3, proc, timeout=300)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=180)[0]
  assert proc.returncode == 143, out[-3000:]
  stopped_at = checkpoint.find_training_step(workdir)
  assert stopped_at is not None and 2 <= int(stopped_at.name) < 8

  done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  ref = {r['step']: r['loss'] for r in metrics.read_metrics(uninterrupted)}
  got = {r['step']: r['loss'] for r in metrics.read_metrics(workdir)}
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               export_params(workdir), export_params(uninterrupted))
  # Both sessions' TensorBoard files and the training checkpoint load from gs:// as well.
  assert len(list(paths.path(workdir).glob('events.out.tfevents.*'))) >= 2
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(locatvit_jax.load(workdir)(x)),
                                np.asarray(locatvit_jax.load(f'{workdir}/export')(x)))


def test_segmentation_with_init_and_workdir_on_gs(gcs_dir, tmp_path):
  model = locatvit_jax.create_model('locatvit_ti16', num_classes=4, img_size=32, width=32, depth=2,
                                    num_heads=2, mlp_dim=64, seed=3)
  checkpoint.save_params(f'{gcs_dir}/backbone', locatvit_jax.get_params(model), model.cfg)
  c = common.segmentation_config('ade20k', None)
  c.update(dict(size='', init=f'{gcs_dir}/backbone', crop_size=32, train_scale=(64, 32), eval_scale=(64, 32),
                head_hidden=16, batch_size=8, total_steps=2, log_every=1, checkpoint_every=2, num_pictures=1))
  c.data.root = upload(write_ade20k(tmp_path / 'ade', per_split=4), f'{gcs_dir}/ade')
  c.input.worker_count = 0
  workdir = f'{gcs_dir}/seg'
  result = segmentation.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  saved = json.loads(paths.path(f'{workdir}/eval_step2.json').read_text())
  assert saved['miou'] == result['miou'] and 0.0 <= result['miou'] <= 1.0
  assert paths.path(f'{workdir}/segmentation_step2.png').read_bytes()[:4] == b'\x89PNG'
  assert [r['step'] for r in metrics.read_metrics(workdir)] == [1, 2]
  # Rerun: finished, so the stored result comes back; evaluation alone works from gs:// too.
  assert segmentation.train_and_evaluate(c, workdir, devices=jax.devices()[:1])['miou'] == result['miou']
  c.eval_only = True
  np.testing.assert_allclose(segmentation.train_and_evaluate(c, workdir, devices=jax.devices()[:1])['miou'],
                             result['miou'])


def test_convert_from_and_to_gs_is_bit_identical(gcs_dir, parity_dir):
  official = f'{gcs_dir}/official.safetensors'
  paths.write_bytes(official, (parity_dir / 'model.safetensors').read_bytes())
  for args in ((official, f'{gcs_dir}/export', '--prr=true'), (f'{gcs_dir}/export', f'{gcs_dir}/back.safetensors', '--to-timm')):
    done = subprocess.run([sys.executable, '-m', 'locatvit_jax.convert', *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
  from safetensors.numpy import load
  back = load(paths.path(f'{gcs_dir}/back.safetensors').read_bytes())
  want = load_file(parity_dir / 'model.safetensors')
  assert sorted(back) == sorted(want)
  assert all(back[k].tobytes() == want[k].tobytes() for k in want)


@pytest.mark.parametrize('path', ['gs://locatvit-test/no/such/export', 'gs://locatvit-test/no/such/w.safetensors'])
def test_missing_gs_checkpoint_is_a_clear_error(gcs_emulator, path):
  with pytest.raises(FileNotFoundError, match=f'{path}: no such file or directory'):
    locatvit_jax.load(path)
