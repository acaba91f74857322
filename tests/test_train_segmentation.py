"""Frozen-backbone segmentation end to end on a tiny ADE20K-layout folder whose colours name the classes.

One training run (a module fixture) serves most tests: its outputs, the backbone read back from its
export, how much the head learnt, the corrupt files it skipped; a resume, eval_only and a rerun of
the finished run start from copies of its workdir.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

import locatvit_jax
from locatvit_jax.configs import common
from locatvit_jax import checkpoint, metrics, sharding
from locatvit_jax.data import seg_sources
from locatvit_jax.models import seg_head
from locatvit_jax.train import segmentation

# Stored ADE20K label (1..3: classes 0..2 after reduce-zero-label) -> its colour in the images.
COLOURS = {1: (230, 40, 40), 2: (40, 200, 60), 3: (50, 60, 220)}
# All fit the eval scale (64, 32) as 32 x 43..45, padded to one input shape: evaluation compiles once.
SIZES = ((40, 56), (44, 60), (48, 64), (42, 58), (46, 62))
# Files that are not images: 2 of the 8 training examples (an image, a label), 1 of the 6 validation ones.
CORRUPT = ('images/training/ADE_2.jpg', 'annotations/training/ADE_5.png', 'images/validation/ADE_3.jpg')
STEPS = 24


def write_colour_ade20k(root, *, per_split=(8, 6)):
  """ADE20K layout; each image is 2x2 blocks of class colours, so a head on frozen features can learn it."""
  rng = np.random.default_rng(0)
  base = root / 'ADEChallengeData2016'
  palette = np.array([(0, 0, 0)] + [COLOURS[k] for k in sorted(COLOURS)], np.uint8)
  for split, n in zip(('training', 'validation'), per_split):
    (base / 'images' / split).mkdir(parents=True)
    (base / 'annotations' / split).mkdir(parents=True)
    for i in range(n):
      h, w = SIZES[i % len(SIZES)]
      stored = np.kron(rng.integers(1, 4, (2, 2)), np.ones((h // 2, w // 2), int)).astype(np.uint8)
      Image.fromarray(palette[stored]).save(base / 'images' / split / f'ADE_{i}.jpg')
      Image.fromarray(stored).save(base / 'annotations' / split / f'ADE_{i}.png')
  for name in CORRUPT:
    (base / name).write_bytes(b'these bytes are not an image')
  return root


@pytest.fixture(scope='module')
def backbone_dir(tmp_path_factory):
  model = locatvit_jax.create_model('locatvit_ti16', num_classes=4, img_size=32, width=32, depth=2,
                                    num_heads=2, mlp_dim=64, seed=3)
  path = tmp_path_factory.mktemp('backbone')
  checkpoint.save_params(path, locatvit_jax.get_params(model), model.cfg)
  return path


@pytest.fixture(scope='module')
def colour_root(tmp_path_factory):
  return write_colour_ade20k(tmp_path_factory.mktemp('ade'))


def seg_config(backbone_dir, data_root, **kw):
  c = common.segmentation_config('ade20k', None)
  c.size = ''
  c.init = str(backbone_dir)
  c.data.root = str(data_root)
  c.crop_size = 32
  c.train_scale = c.eval_scale = (64, 32)
  c.head_hidden = 16
  c.input.worker_count = 0
  c.batch_size = 8
  c.total_steps = STEPS
  c.optim.lr = 1e-2
  c.log_every, c.checkpoint_every = 4, 8
  c.num_pictures = 2
  c.update(kw)
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory, backbone_dir, colour_root):
  """(config, workdir, result) of one finished run."""
  config = seg_config(backbone_dir, colour_root)
  workdir = tmp_path_factory.mktemp('seg') / 'run'
  return config, workdir, segmentation.train_and_evaluate(config, str(workdir))


def test_outputs_and_corrupt_files_skipped_and_counted(trained):
  config, workdir, result = trained
  assert 0.0 <= result['miou'] <= 1.0 and 0.0 <= result['pixel_acc'] <= 1.0
  rows = metrics.read_metrics(workdir)
  assert [r['step'] for r in rows] == [1, 4, 8, 12, 16, 20, 24] and 'miou' in rows[-1]
  # A batch of 8 is one epoch of the 8 training files, 2 of them corrupt: 2 more skipped every step.
  assert [r['data/skipped'] for r in rows] == [2 * r['step'] for r in rows]
  # One corrupt validation image: left out of the metric, counted, stored with the result.
  assert result['eval_skipped'] == 1
  assert json.loads((workdir / f'eval_step{STEPS}.json').read_text())['eval_skipped'] == 1
  assert (workdir / f'segmentation_step{STEPS}.png').stat().st_size > 0
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['16', '24']


def test_export_holds_the_initial_backbone_and_the_trained_head(trained, backbone_dir):
  _, workdir, result = trained
  # Read back from disk: what the train steps returned, bit-identical to the checkpoint it started from.
  exported = checkpoint.restore_params(workdir / 'export')
  initial = segmentation.params_sha256(checkpoint.restore_params(backbone_dir))
  assert segmentation.params_sha256(exported['backbone']) == initial == result['backbone_sha256']
  jax.tree.map(np.testing.assert_array_equal, exported['head'], checkpoint.restore_params(workdir))
  assert checkpoint.read_model_record(workdir / 'export')[0] == {
      'init': str(backbone_dir), 'backbone': checkpoint.read_model_record(backbone_dir)[0], 'num_classes': 150,
      'hidden': 16}


def test_the_head_learns(trained):
  """The exported model scores the run's mIoU; the same backbone with an untrained head scores ~0."""
  config, workdir, result = trained
  backbone, head = segmentation.load_export(workdir / 'export')
  bb_graphdef, bb_params, bb_rest = nnx.split(backbone, nnx.Param, ...)
  source = seg_sources.segmentation_source(config.data, config.data.eval_split)

  def miou(head):
    head_graphdef, head_params = nnx.split(head, nnx.Param)
    predict = segmentation.make_predict(bb_graphdef, head_graphdef)
    return segmentation.evaluate(predict, head_params, bb_params, bb_rest, config, source)['miou']

  untrained = miou(seg_head.SegHead(32, 150, hidden=config.head_hidden, rngs=nnx.Rngs(config.seed)))
  assert miou(head) == result['miou']
  # Measured: 0.82 after 24 steps; 0.0 untrained (it predicts classes the images do not hold).
  assert result['miou'] > 0.6 and untrained < 0.1


def test_resume_gives_the_same_head(trained, tmp_path):
  config, workdir, result = trained
  shutil.copytree(workdir, tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / str(STEPS))
  resumed = segmentation.train_and_evaluate(config, str(tmp_path / 'b'))
  assert resumed['miou'] == result['miou'] and resumed['backbone_sha256'] == result['backbone_sha256']
  head = lambda d: checkpoint.TrainCheckpointer(d, save_every=8).read_state(STEPS)['params']
  jax.tree.map(np.testing.assert_array_equal, head(workdir), head(tmp_path / 'b'))


def test_eval_only_and_rerun_of_a_finished_run(trained, tmp_path, monkeypatch):
  config, workdir, result = trained
  shutil.copytree(workdir, tmp_path / 'w')
  monkeypatch.setattr(sharding, 'to_global', lambda *a: pytest.fail('a finished run fed a batch to the devices'))
  again = segmentation.train_and_evaluate(config, str(tmp_path / 'w'))
  assert {k: again[k] for k in ('miou', 'backbone_sha256', 'eval_skipped')} == {
      k: result[k] for k in ('miou', 'backbone_sha256', 'eval_skipped')}
  config = seg_config(config.init, config.data.root, eval_only=True)
  evaluated = segmentation.train_and_evaluate(config, str(tmp_path / 'w'))
  assert evaluated['miou'] == result['miou'] and evaluated['eval_skipped'] == 1


def test_wrong_backbone_size_and_missing_init(tmp_path, backbone_dir, colour_root):
  with pytest.raises(ValueError, match='holds a width-32 backbone'):
    segmentation.train_and_evaluate(seg_config(backbone_dir, colour_root, size='b'), str(tmp_path))
  with pytest.raises(ValueError, match='config.init is empty'):
    segmentation.train_and_evaluate(seg_config(backbone_dir, colour_root, init=''), str(tmp_path))


def test_optimizer_decays_every_head_parameter():
  """mmcv's DefaultOptimizerConstructor without paramwise_cfg: AdamW's decoupled decay on the kernels,
  the classifier bias and GroupNorm alike. With zero gradients Adam's step is 0, so one step
  multiplies every parameter by 1 - lr * weight_decay."""
  optim_cfg = common.segmentation_config('ade20k', None).optim
  assert optim_cfg.weight_decay == 0.01 and not optim_cfg.grad_clip
  head = seg_head.SegHead(8, 3, hidden=4, rngs=nnx.Rngs(0))
  head.norm.bias[...] = jnp.full(4, 0.5)  # zero biases would hide a missing decay
  head.classifier.bias[...] = jnp.full(3, -2.0)
  params = nnx.state(head, nnx.Param)
  tx = segmentation.head_optimizer(optax.constant_schedule(0.5), optim_cfg)

  @jax.jit  # one compilation, not one per eager op
  def step(params):
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates)

  jax.tree.map(lambda new, old: np.testing.assert_allclose(new, old * (1 - 0.5 * 0.01), rtol=1e-6),
               step(params), params)


@pytest.mark.parametrize('override, message', [
    (dict(patch_size=8, crop_size=32), 'patch_size=8 but config.init=.* holds a backbone whose features have stride 16'),
    (dict(crop_size=40), 'crop_size=40 is not a multiple of patch_size=16'),
    (dict(init='/no/such/backbone'), r'config.init=/no/such/backbone cannot be loaded: .*no such file'),
    (dict(eval_only=True), 'eval_only=True but .* holds no trained head'),
    (dict(checkpoint_every=0), 'checkpoint_every=0; expected an integer >= 1'),
    (dict(batch_size=12), 'batch_size=12 is not divisible by data-parallel size 8'),  # conftest's 8 devices
    (dict(eval_geometry='middle'), r"eval_geometry='middle'; expected one of \('reference', 'crop'\)"),
    (dict(loss_average='mean'), r"loss_average='mean'; expected one of \('all', 'labelled'\)"),
])
def test_bad_settings_fail_before_any_step_and_write_nothing(tmp_path, backbone_dir, colour_root, override, message):
  with pytest.raises(ValueError, match=message):
    segmentation.train_and_evaluate(seg_config(backbone_dir, colour_root, **override), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
