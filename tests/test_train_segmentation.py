"""Frozen-backbone segmentation end to end on a tiny ADE20K-layout folder made here."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import locatvit_jax
from locatvit_jax.configs import common
from locatvit_jax import checkpoint, metrics, sharding
from locatvit_jax.train import segmentation
from tests.test_seg_data import write_ade20k


@pytest.fixture(scope='module')
def backbone_dir(tmp_path_factory):
  model = locatvit_jax.create_model('locatvit_ti16', num_classes=4, img_size=32, width=32, depth=2,
                                    num_heads=2, mlp_dim=64, seed=3)
  path = tmp_path_factory.mktemp('backbone')
  checkpoint.save_params(path, locatvit_jax.get_params(model), model.cfg)
  return path


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory):
  return write_ade20k(tmp_path_factory.mktemp('ade'), per_split=6)


def seg_config(backbone_dir, ade_root, **kw):
  c = common.segmentation_config('ade20k', None)
  c.size = ''
  c.init = str(backbone_dir)
  c.data.root = str(ade_root)
  c.crop_size = 32
  c.train_scale = c.eval_scale = (64, 32)
  c.head_hidden = 16
  c.input.worker_count = 0
  c.batch_size = 8
  c.total_steps = 4
  c.log_every, c.checkpoint_every = 1, 2
  c.num_pictures = 2
  c.update(kw)
  return c


def test_train_resume_evaluate_and_pictures(tmp_path, backbone_dir, ade_root):
  config = seg_config(backbone_dir, ade_root)
  result = segmentation.train_and_evaluate(config, str(tmp_path / 'a'))
  assert 0.0 <= result['miou'] <= 1.0 and 0.0 <= result['pixel_acc'] <= 1.0
  rows = metrics.read_metrics(tmp_path / 'a')
  assert [r['step'] for r in rows] == [1, 2, 3, 4] and 'miou' in rows[-1]
  assert (tmp_path / 'a' / 'segmentation_step4.png').stat().st_size > 0
  assert sorted(p.name for p in (tmp_path / 'a' / 'checkpoints').iterdir()) == ['2', '4']
  # The backbone the trainer holds at the end is bit-identical to the checkpoint it started from.
  initial = nnx.state(locatvit_jax.load(backbone_dir), nnx.Param)
  assert result['backbone_sha256'] == segmentation.params_sha256(initial)

  # Resume: drop the final checkpoint and rerun; the head must end bit-identical.
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '4')
  result_b = segmentation.train_and_evaluate(config, str(tmp_path / 'b'))
  assert result_b['miou'] == result['miou']
  head = lambda d: checkpoint.TrainCheckpointer(d, save_every=2).read_state(4)['params']
  jax.tree.map(np.testing.assert_array_equal, head(tmp_path / 'a'), head(tmp_path / 'b'))

  # Evaluation only, from the checkpoint.
  config.eval_only = True
  again = segmentation.train_and_evaluate(config, str(tmp_path / 'a'))
  np.testing.assert_allclose(again['miou'], result['miou'])


def test_wrong_backbone_size_and_missing_init(tmp_path, backbone_dir, ade_root):
  with pytest.raises(ValueError, match='holds a width-32 backbone'):
    segmentation.train_and_evaluate(seg_config(backbone_dir, ade_root, size='b'), str(tmp_path))
  with pytest.raises(ValueError, match='config.init is empty'):
    segmentation.train_and_evaluate(seg_config(backbone_dir, ade_root, init=''), str(tmp_path))


@pytest.mark.parametrize('override, message', [
    (dict(patch_size=8, crop_size=32), 'patch_size=8 but config.init=.* holds a backbone with patch size 16'),
    (dict(crop_size=40), 'crop_size=40 is not a multiple of patch_size=16'),
    (dict(init='/no/such/backbone'), r'config.init=/no/such/backbone cannot be loaded: .*no such file'),
    (dict(eval_only=True), 'eval_only=True but .* holds no trained head'),
    (dict(checkpoint_every=0), 'checkpoint_every=0; expected an integer >= 1'),
])
def test_bad_settings_fail_before_any_step_and_write_nothing(tmp_path, backbone_dir, ade_root, override, message):
  with pytest.raises(ValueError, match=message):
    segmentation.train_and_evaluate(seg_config(backbone_dir, ade_root, **override), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_rerunning_a_finished_run_returns_its_result_without_training(tmp_path, backbone_dir, ade_root, monkeypatch):
  config = seg_config(backbone_dir, ade_root)
  first = segmentation.train_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(sharding, 'to_global', lambda *a: pytest.fail('a finished run fed a batch to the devices'))
  again = segmentation.train_and_evaluate(config, str(tmp_path))
  assert again['miou'] == first['miou'] and again['backbone_sha256'] == first['backbone_sha256']
