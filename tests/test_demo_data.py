"""The digit-scenes demo dataset: deterministic build, labels, masks, split by source scan."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from locatvit_jax.data import demo

TINY = dict(image_size=32, num_train=200, num_val=50)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('demo_data'))
  return data_dir, demo.build_demo_dataset(data_dir, seed=0, **TINY)


def _data_files(data_dir, name):
  config = name.split('/')[1].split(':')[0]
  return {p.name: p.read_bytes()
          for p in sorted((tfds.core.Path(data_dir) / demo.NAME / config).glob('*/*.array_record-*'))}


def _records(data_dir, name, split):
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return [source[i] for i in range(len(source))]


def test_same_seed_same_bytes_and_another_seed_differs(built, tmp_path):
  data_dir, name = built
  again = demo.build_demo_dataset(str(tmp_path / 'again'), seed=0, **TINY)
  other = demo.build_demo_dataset(str(tmp_path / 'other'), seed=1, **TINY)
  assert again == name and other != name
  reference = _data_files(data_dir, name)
  assert len(reference) == 2  # one train and one validation file
  assert _data_files(str(tmp_path / 'again'), again) == reference
  other_files = _data_files(str(tmp_path / 'other'), other)
  assert sorted(other_files) == sorted(reference)
  assert all(other_files[f] != reference[f] for f in reference)


def test_build_is_reused_and_settings_do_not_collide(built):
  data_dir, name = built
  assert demo.build_demo_dataset(data_dir, seed=0, **TINY) == name  # prepared: nothing rebuilt
  assert name == 'locat_digit_scenes/px32_train200_val50_seed0:2.0.0'
  assert demo.DigitScenesConfig.of(32, 200, 50, 0).name != demo.DigitScenesConfig.of(32, 200, 51, 0).name


def test_records_labels_and_masks_agree(built):
  data_dir, name = built
  digits = load_digits()
  for split, count in (('train', TINY['num_train']), ('validation', TINY['num_val'])):
    records = _records(data_dir, name, split)
    assert len(records) == count
    for r in records:
      assert r['image'].shape == (32, 32, 3) and r['image'].dtype == np.uint8
      assert r['mask'].shape == (32, 32, 1) and r['mask'].dtype == np.uint8
      label, scans = int(r['label']), r['scan_ids']
      assert 0 <= label < demo.NUM_CLASSES and 2 <= len(scans) <= 4
      classes = digits.target[scans]
      assert classes[0] == label and len(set(classes)) == len(classes)  # distractors differ from the label
      shown = set(np.unique(r['mask']).tolist())
      assert 1 + label in shown  # the main digit is drawn last: never hidden
      assert shown <= {0} | {1 + int(c) for c in classes}
  labels = [int(r['label']) for r in _records(data_dir, name, 'train')]
  assert len(set(labels)) == demo.NUM_CLASSES  # every class occurs


def test_ink_is_darker_than_paper(built):
  # The property that makes the scenes learnable in minutes: every digit's ink is darker than the
  # paper around it, whatever the colours.
  data_dir, name = built
  for r in _records(data_dir, name, 'train')[:50]:
    brightness, mask = r['image'].astype(np.float32).mean(-1), r['mask'][..., 0]
    for cls in np.unique(mask[mask > 0]):
      assert brightness[mask == cls].mean() < brightness[mask == 0].mean() - 60, cls


def test_validation_only_shows_unseen_handwriting(built):
  data_dir, name = built
  used = {split: {int(s) for r in _records(data_dir, name, split) for s in r['scan_ids']}
          for split in demo.SPLITS}
  assert not used['train'] & used['validation']
  parts = demo.split_scans(load_digits().target, seed=0)
  assert used['validation'] <= set(parts['validation'].tolist())
  assert len(parts['train']) + len(parts['validation']) == 1797
  assert abs(len(parts['validation']) / 1797 - demo.VAL_FRACTION) < 0.01


def test_features_describe_the_records(built):
  data_dir, name = built
  features = tfds.data_source(name, split='train', data_dir=data_dir).dataset_info.features
  assert features['label'].num_classes == demo.NUM_CLASSES
  assert features['image'].shape == (32, 32, 3)


@pytest.mark.parametrize('kwargs, message', [
    (dict(image_size=40), 'image_size=40; expected a multiple of 16 in 32..96'),
    (dict(image_size=112), 'image_size=112'),
    (dict(num_train=0), 'num_train=0; expected an integer >= 1'),
    (dict(seed=-1), 'seed=-1; expected an integer >= 0'),
])
def test_bad_settings_fail_clearly(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    demo.build_demo_dataset(str(tmp_path), **kwargs)
