"""What a training run promises beyond running: it learns, counts skipped images, prunes and keeps
checkpoints, stops on a non-finite loss, and accumulates gradients without moving the batch.

One learning run (module fixture) serves several tests; the other runs have the same model and
schedule, so the session's compilation cache (conftest.py) serves their steps.
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from locatvit_jax import checkpoint, metrics, sharding
from locatvit_jax.train import classification, common
from tests.conftest import tiny_classification_config

STEPS = 40
CORRUPT = 3  # undecodable files in the train split
GOOD = 24  # decodable images per split, 6 a class
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]

# Plain supervised learning, at a rate at which a tiny ViT from scratch learns the colours in a few
# dozen steps (measured: loss 1.40 -> 0.46, top-1 1.0): no mixup, drop path, RandAugment or erasing.
LEARNABLE = {'total_steps': STEPS, 'warmup_steps': 3, 'optim.lr': 3e-3, 'model.drop_path': 0.0,
             'mixup.mixup_alpha': 0.0, 'mixup.cutmix_alpha': 0.0, 'aug.randaug_num_ops': 0,
             'aug.erase_prob': 0.0}


@pytest.fixture(scope='module')
def data_with_corrupt_images(tmp_path_factory):
  """root/{train,val}/class_C/*.png, class C a noisy shade of COLOURS[C], and CORRUPT undecodable
  files in train. (make_image_folder's colours lie on one line in RGB; trained on them, this model
  still put class 0 in class 1 after 80 steps.)"""
  root = tmp_path_factory.mktemp('learnable_data')
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for c, colour in enumerate(COLOURS):
      d = root / split / f'class_{c}'
      d.mkdir(parents=True)
      for i in range(GOOD // len(COLOURS)):
        img = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40 + 8 * (i % 3), 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(d / f'{i}.png')
  for c in range(CORRUPT):
    (root / 'train' / f'class_{c}' / 'corrupt.png').write_bytes(b'not an image')
  return root


@pytest.fixture(scope='module')
def learned(tmp_path_factory, data_with_corrupt_images):
  """(workdir, result) of a run of STEPS steps that checkpoints every 10 and keeps 2."""
  config = tiny_classification_config(str(data_with_corrupt_images), checkpoint_every=10, keep_checkpoints=2,
                                      **LEARNABLE)
  workdir = tmp_path_factory.mktemp('learned')
  result = classification.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  return workdir, result


def test_training_learns(learned):
  workdir, result = learned
  losses = [r['loss'] for r in metrics.read_metrics(workdir)]
  assert len(losses) == STEPS
  assert np.mean(losses[-5:]) < 0.5 * losses[0], losses
  assert result['eval_top1'] >= 0.75  # 4 classes: chance is 0.25


def test_only_the_newest_keep_checkpoints_remain(learned):
  workdir, _ = learned
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int) == [str(STEPS - 10), str(STEPS)]


def test_skipped_images_are_counted_in_the_metrics(learned):
  workdir, _ = learned
  # A corrupt file is counted when the next decodable one is taken: once a step has taken images
  # of some epoch, every earlier epoch's CORRUPT are counted, and at most this one's.
  for row in metrics.read_metrics(workdir):
    epoch = math.ceil(row['step'] * 8 / GOOD)  # 8 decodable images a step
    assert CORRUPT * (epoch - 1) <= row['data/skipped'] <= CORRUPT * epoch, row


def test_eval_only_writes_the_newest_checkpoints_result(learned, data_with_corrupt_images):
  workdir, trained = learned
  config = tiny_classification_config(str(data_with_corrupt_images), eval_only=True, **LEARNABLE)
  result = classification.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert result['step'] == STEPS and result['eval_top1'] == trained['eval_top1']
  written = json.loads((workdir / common.eval_result_name(STEPS)).read_text())
  assert written['eval_top1'] == trained['eval_top1'] and written['step'] == STEPS


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_with_corrupt_images, monkeypatch):
  build = classification.build
  poison = jax.jit(lambda tree: jax.tree.map(lambda x: x * jnp.nan, tree))

  def poisoned_build(*args, **kwargs):
    """The real step (its compilation cached from `learned`), diverged from step 3 on."""
    setup = build(*args, **kwargs)

    def train_step(state, rest, batch):
      state, scalars = setup.train_step(state, rest, batch)
      if common.host_int(state['step']) >= 3:
        params, loss = poison((state['params'], scalars['loss']))
        state, scalars = {**state, 'params': params}, {**scalars, 'loss': loss}
      return state, scalars

    return dataclasses.replace(setup, train_step=train_step)

  monkeypatch.setattr(classification, 'build', poisoned_build)
  # Logged (and checked) every 2 steps: step 4 is the first check that sees the NaN, and a save step.
  config = tiny_classification_config(str(data_with_corrupt_images), log_every=2, checkpoint_every=2,
                                      **LEARNABLE)
  with pytest.raises(common.NonFiniteLossError, match='loss is nan at step 4: stopping; the last good checkpoint'):
    classification.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert os.listdir(tmp_path / 'checkpoints') == ['2']
  params = checkpoint.TrainCheckpointer(tmp_path, save_every=2).read_state(2)['params']
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


# -- gradient accumulation and remat on a data-parallel mesh -----------------------------------------
def test_grad_accum_with_remat_matches_one_batch_and_keeps_the_batch_local():
  """grad_accum=2 with remat='dots' gives the updates of one plain step on the same global batch,
  and splits the batch without moving rows between devices."""
  # Micro-batches draw their own drop path masks, mixup groups and erased boxes: all off, so
  # accumulation must give the same updates.
  base = {'model.drop_path': 0.0, 'mixup.mixup_alpha': 0.0, 'mixup.cutmix_alpha': 0.0, 'aug.erase_prob': 0.0}
  mesh = sharding.make_mesh({'data': 4}, jax.devices()[:4])
  rng = np.random.default_rng(0)
  batches = [sharding.to_global({'image': rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                                 'label': rng.integers(0, 4, 8).astype(np.int32)}, mesh) for _ in range(3)]

  def setup_for(mesh, **overrides):
    config = tiny_classification_config(**{**base, **overrides})
    config.data.num_classes = 4
    return classification.build(config, classification.check_config(config, mesh), mesh, 6, 2)

  # Initialised on one device, as in `learned`, whose compiled initialiser is then reused.
  initial = jax.device_get(setup_for(sharding.make_mesh({}, jax.devices()[:1])).init_state())

  def train(**overrides):
    """(compiled step's HLO, scalars of each step, final params) from the same initial state."""
    setup = setup_for(mesh, **overrides)
    state = jax.device_put(initial, setup.shardings)
    step = setup.train_step.lower(state, setup.rest, batches[0]).compile()
    scalars = []
    for batch in batches:
      state, s = step(state, setup.rest, batch)
      scalars.append([float(s['loss']), float(s['grad_norm'])])
    return step.as_text(), scalars, jax.device_get(state['params'])

  _, scalars, params = train()
  hlo, accum_scalars, accum_params = train(grad_accum=2, **{'model.remat': 'dots'})
  # Parameters are replicated on a data-only mesh: the only collective a step needs is the
  # gradients' all-reduce. Moving micro-batch rows between devices would add one of these.
  assert 'all-reduce' in hlo
  for op in ('all-to-all', 'all-gather', 'collective-permute'):
    assert op not in hlo, f'the accumulating step has an {op}'
  np.testing.assert_allclose(accum_scalars, scalars, rtol=1e-5)
  # Adam divides by sqrt(v): parameters with ~0 gradients amplify float32 noise (measured 4e-6),
  # while a wrong gradient moves them by about the learning rate (1e-3).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5), accum_params, params)
  # Mixup groups and erasing stay in each device's rows (timm mixes each GPU's batch): the step
  # that mixes and erases moves no rows either.
  mixing = setup_for(mesh, **{'mixup.mixup_alpha': 0.8, 'mixup.cutmix_alpha': 1.0, 'aug.erase_prob': 0.25})
  hlo = mixing.train_step.lower(jax.device_put(initial, mixing.shardings), mixing.rest, batches[0]).compile().as_text()
  for op in ('all-to-all', 'all-gather', 'collective-permute'):
    assert op not in hlo, f'{op} in the mixing step'
