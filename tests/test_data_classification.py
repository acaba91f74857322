"""Classification input pipeline: sources, timm-style transforms, sharding, resume, workers, errors."""

import io
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from locatvit_jax.data import pipeline, sources, transforms
from tests.conftest import make_image_folder

IMG = 32


def aug_config(**overrides):
  aug = pipeline.default_aug_config()
  aug.eval_resize = 36
  aug.update(overrides)
  return aug


def loader(source, **kwargs):
  kwargs = {'train': True, 'global_batch_size': 4, 'img_size': IMG, 'aug': aug_config(), 'seed': 0,
            'worker_count': 0, 'shard_index': 0, 'shard_count': 1, **kwargs}
  return pipeline.classification_loader(source, **kwargs)


def take(it, n):
  return [next(it) for _ in range(n)]


def png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, 'PNG')
  return buf.getvalue()


class IndexedSource:
  """n small PNGs whose label is their index, so a batch says exactly which examples it holds."""

  def __init__(self, n, size=20):
    rng = np.random.default_rng(0)
    self.images = [png(rng.integers(0, 256, (size, size + i % 5, 3), np.uint8)) for i in range(n)]
    self.num_classes = n

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': i, 'key': f'indexed[{i}]'}


@pytest.fixture(scope='module')
def folder_with_corrupt(tmp_path_factory):
  """4 classes x 6 images per split, plus one corrupt file in train and in val."""
  root = make_image_folder(tmp_path_factory.mktemp('corrupt'), classes=4, per_class=6)
  for split in ('train', 'val'):
    (root / split / 'class_2' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
  return root


# -- sources -----------------------------------------------------------------------------------------
def test_image_folder_source(folder_with_corrupt, tmp_path):
  source = sources.image_folder_source(str(folder_with_corrupt / 'train'))
  assert source.classes == ['class_0', 'class_1', 'class_2', 'class_3'] and len(source) == 25
  labels = [source[i]['label'] for i in range(len(source))]
  assert labels == sorted(labels) and set(labels) == {0, 1, 2, 3}
  record = source[0]
  assert record['key'].endswith('class_0/0.png') and record['image'][:4] == b'\x89PNG'
  (tmp_path / 'empty' / 'cls').mkdir(parents=True)
  (tmp_path / 'empty' / 'cls' / 'notes.txt').write_text('no images here')
  with pytest.raises(ValueError, match='has no images in class subfolders'):
    sources.image_folder_source(str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match='does not exist'):
    sources.image_folder_source(str(tmp_path / 'missing'))


def test_classification_source_dispatch(folder_with_corrupt):
  cfg = ml_collections.ConfigDict(dict(kind='folder', root=str(folder_with_corrupt), name='', data_dir=None,
                                       train_split='train', eval_split='val', num_classes=4))
  assert len(sources.classification_source(cfg, cfg.eval_split)) == 25
  cfg.num_classes = 5
  with pytest.raises(ValueError, match='has 4 classes but data.num_classes=5'):
    sources.classification_source(cfg, 'train')
  cfg.kind = 'webdataset'
  with pytest.raises(ValueError, match=r"data.kind='webdataset'; expected one of \('tfds', 'folder'\)"):
    sources.classification_source(cfg, 'train')


def test_mock_imagenet_train_and_eval():
  cfg = ml_collections.ConfigDict(dict(kind='tfds', name='imagenet2012', data_dir=None, train_split='train',
                                       eval_split='validation', num_classes=1000))
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    train = sources.classification_source(cfg, cfg.train_split)
    record = train[3]
    assert record['key'].startswith('imagenet2012/train[3]') and 0 <= record['label'] < 1000
    batches = take(iter(loader(train)), 3)
    evaluation = list(loader(sources.classification_source(cfg, cfg.eval_split), train=False))
  for b in batches:
    assert b['image'].shape == (4, IMG, IMG, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and np.all((b['label'] >= 0) & (b['label'] < 1000))
    assert np.all(np.isfinite(b['image']))
  assert len(evaluation) == 3 and sum(b['valid'].sum() for b in evaluation) == 10
  assert np.all(np.abs(np.concatenate([b['image'] for b in evaluation])) <= 1.0)


def write_tfds_arrayrecord(data_dir, name='toy_images', labels=(0, 1, 2, 0, 1, 2)):
  """A prepared TFDS dataset as a real run reads it: tf.Example records in ArrayRecord + metadata,
  one JPEG per label and a corrupt JPEG (label 1) at the end."""
  from array_record.python import array_record_module
  from tensorflow_datasets.proto import tf_example_pb2

  rng = np.random.default_rng(0)
  images = []
  for _ in labels:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(buf, 'JPEG')
    images.append(buf.getvalue())
  directory = data_dir / name / '1.0.0'
  directory.mkdir(parents=True)
  writer = array_record_module.ArrayRecordWriter(
      str(directory / f'{name}-train.array_record-00000-of-00001'), 'group_size:1')
  for image, label in zip(images + [b'\xff\xd8\xff truncated'], list(labels) + [1]):
    example = tf_example_pb2.Example()
    example.features.feature['image'].bytes_list.value.append(image)
    example.features.feature['label'].int64_list.value.append(label)
    writer.write(example.SerializeToString())
  writer.close()
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(None, None, 3)),
                                         'label': tfds.features.ClassLabel(num_classes=3)})
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=features, check_data=False,
      split_infos=[tfds.core.SplitInfo(name='train', shard_lengths=[len(labels) + 1], num_bytes=0)])


def test_tfds_arrayrecord_source_reads_encoded_images(tmp_path):
  write_tfds_arrayrecord(tmp_path)
  source = sources.tfds_source('toy_images', 'train', data_dir=str(tmp_path))
  assert len(source) == 7 and source.num_classes == 3
  record = source[1]
  assert record['image'][:2] == b'\xff\xd8' and record['label'] == 1 and record['key'] == 'toy_images/train[1]'
  batches = list(loader(source, train=False))
  np.testing.assert_array_equal(np.concatenate([b['valid'] for b in batches]), [1] * 6 + [0] * 2)
  np.testing.assert_array_equal(np.concatenate([b['skipped'] for b in batches]), [0] * 6 + [1, 0])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:6], [0, 1, 2, 0, 1, 2])


# -- transforms --------------------------------------------------------------------------------------
def test_decode_handles_bytes_arrays_and_corrupt_files():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
  decode = transforms.DecodeImage()
  for image in (png(rgb), rgb, png(rgb[..., 0]), rgb[..., :1]):
    out = decode.map({'image': image, 'label': 1, 'key': 'k'})['image']
    assert out.mode == 'RGB' and out.size == (7, 5)
  np.testing.assert_array_equal(np.asarray(decode.map({'image': png(rgb), 'label': 1, 'key': 'k'})['image']), rgb)
  assert decode.map({'image': png(rgb)[:40], 'label': 1, 'key': 'k'})['image'] is None


def test_random_resized_crop_box():
  rng = np.random.default_rng(0)
  for _ in range(50):
    left, top, w, h = transforms.random_resized_crop_box(60, 40, (0.08, 1.0), (3 / 4, 4 / 3), rng)
    assert 0 <= left and left + w <= 60 and 0 <= top and top + h <= 40
    assert 0.08 * 2400 * 0.8 <= w * h <= 2400 and 0.7 < w / h < 1.4  # rounding slack
  # No crop of 90-100% area fits a 100x10 image at ratio <= 4/3: timm's centre crop at max ratio.
  assert transforms.random_resized_crop_box(100, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (43, 0, 13, 10)
  assert transforms.random_resized_crop_box(10, 100, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, 43, 10, 13)


def test_rand_augment_ops_change_images_and_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.integers(40, 200, (IMG, IMG, 3), np.uint8)  # low contrast, so autocontrast has work to do
  image = Image.fromarray(x)
  for name in transforms.RAND_AUGMENT_OPS:
    for increasing in (False, True):
      out = transforms.apply_op(image, name, 9.0, rng, increasing=increasing)
      assert out.mode == 'RGB' and out.size == image.size, name
    # At magnitude 9 every op of the increasing set is strong (the original set's solarize is not).
    assert not np.array_equal(np.asarray(out), x), name
  # Pixel ops at magnitude 9 against their definitions (timm's 'increasing' arguments).
  op = lambda name: np.asarray(transforms.apply_op(image, name, 9.0, rng)).astype(int)
  np.testing.assert_array_equal(op('Invert'), 255 - x)
  np.testing.assert_array_equal(op('Posterize'), x & 0b10000000)  # 4 - int(3.6) = 1 bit kept
  np.testing.assert_array_equal(op('Solarize'), np.where(x >= 26, 255 - x, x))  # 256 - int(230.4)
  np.testing.assert_array_equal(op('SolarizeAdd'), np.where(x < 128, np.minimum(x + 99, 255), x))


def test_rand_augment_respects_op_count_and_seed():
  image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (IMG, IMG, 3), np.uint8))
  kwargs = dict(num_ops=2, magnitude=9, magnitude_std=0.5, increasing=True, fill=(128, 128, 128),
                interpolation='random')
  a = transforms.rand_augment(image, np.random.default_rng(5), **kwargs)
  b = transforms.rand_augment(image, np.random.default_rng(5), **kwargs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert transforms.rand_augment(image, np.random.default_rng(5), **{**kwargs, 'num_ops': 0}) is image


def test_the_loader_leaves_random_erasing_to_the_train_step():
  # timm erases after mixup (train/mixup.py); the input pipeline's images are the same at any erase_prob.
  source = IndexedSource(8)
  a = take(iter(loader(source, aug=aug_config(erase_prob=0.0))), 2)
  b = take(iter(loader(source, aug=aug_config(erase_prob=1.0))), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])


def test_eval_preprocess_sizes_and_normalisation():
  image = Image.new('RGB', (60, 40), (255, 0, 51))
  assert transforms.resize_short_side(image, 36).size == (54, 36)
  assert transforms.resize_short_side(image.transpose(Image.TRANSPOSE), 36).size == (36, 54)
  out = transforms.EvalPreprocess(IMG, 36, (0.5,) * 3, (0.5,) * 3).map({'image': image, 'label': 3, 'key': 'k'})
  assert out['image'].shape == (IMG, IMG, 3) and out['valid'] == 1 and out['label'] == 3
  np.testing.assert_allclose(out['image'][5, 5], [1.0, -1.0, 51 / 255 * 2 - 1], atol=1e-6)


# -- the loader ----------------------------------------------------------------------------------------
def test_train_batches_shapes_ranges_and_seed():
  source = IndexedSource(12)
  clean = aug_config(erase_prob=0.0)
  batch = next(iter(loader(source, aug=clean)))
  assert batch['image'].shape == (4, IMG, IMG, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
  assert -1.0 <= batch['image'].min() < batch['image'].max() <= 1.0  # (x / 255 - 0.5) / 0.5
  assert not batch['skipped'].any()
  a, b = take(iter(loader(source)), 4), take(iter(loader(source)), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  other = take(iter(loader(source, seed=1)), 4)
  assert any(not np.array_equal(x['label'], y['label']) for x, y in zip(a, other))
  # Each epoch is a fresh permutation of the whole dataset.
  epochs = np.concatenate([x['label'] for x in take(iter(loader(source)), 6)]).reshape(2, 12)
  assert all(sorted(e) == list(range(12)) for e in epochs) and not np.array_equal(*epochs)


def test_shards_are_disjoint_and_cover_the_dataset():
  source = IndexedSource(16)
  train = [np.concatenate([b['label'] for b in loader(source, global_batch_size=4, shard_index=i, shard_count=2,
                                                      num_epochs=1)]) for i in range(2)]
  assert len(train[0]) == len(train[1]) == 8 and not set(train[0]) & set(train[1])
  assert sorted(np.concatenate(train)) == list(range(16))
  # Eval: 13 examples, 2 processes, 2 per process per batch -> 4 batches each, 3 padding rows in all.
  source = IndexedSource(13)
  shards = [list(loader(source, train=False, shard_index=i, shard_count=2)) for i in range(2)]
  assert [len(s) for s in shards] == [4, 4]
  valid = [np.concatenate([b['label'][b['valid'] == 1] for b in s]) for s in shards]
  assert sorted(np.concatenate(valid)) == list(range(13)) and list(valid[0]) == list(range(0, 13, 2))


def test_eval_padding_mask():
  batches = list(loader(IndexedSource(10), train=False))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b['valid'] for b in batches]), [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(batches[0]['label'], [0, 1, 2, 3])
  assert not batches[-1]['image'][2:].any() and batches[-1]['image'][:2].any()


def test_iterator_resumes_exactly_from_its_state():
  ds = loader(IndexedSource(10))
  it = iter(ds)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what the Orbax handler writes
  expected = take(it, 2)
  resumed = iter(ds)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 2)):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_corrupt_images_are_skipped_and_counted(folder_with_corrupt):
  train = sources.image_folder_source(str(folder_with_corrupt / 'train'))
  batches = take(iter(loader(train, global_batch_size=8)), 7)  # 56 of 24 good images a epoch: > 2 epochs
  assert all(np.all(np.abs(b['image']) < 10) for b in batches)
  assert 2 <= sum(int(b['skipped'].sum()) for b in batches) <= 3  # once per epoch read
  val = sources.image_folder_source(str(folder_with_corrupt / 'val'))
  evaluation = list(loader(val, train=False, global_batch_size=8))
  assert sum(int(b['valid'].sum()) for b in evaluation) == 24
  assert sum(int(b['skipped'].sum()) for b in evaluation) == 1


def test_worker_processes(folder_with_corrupt):
  """Two Grain worker processes: every example once, the corrupt file counted, an exact resume."""
  val = sources.image_folder_source(str(folder_with_corrupt / 'val'))
  # 25 files in batches of 12 -> 3 full batches; each worker builds whole batches.
  batches = list(loader(val, train=False, global_batch_size=12, worker_count=2))
  assert [b['image'].shape[0] for b in batches] == [12, 12, 12]
  assert sum(int(b['valid'].sum()) for b in batches) == 24 and sum(int(b['skipped'].sum()) for b in batches) == 1
  labels = np.concatenate([b['label'][b['valid'] == 1] for b in batches])
  assert list(labels) == [val[i]['label'] for i in range(len(val)) if 'broken' not in val[i]['key']]
  ds = loader(val, worker_count=2)
  it = iter(ds)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 2)
  it.close()
  resumed = iter(ds)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 2)):
    np.testing.assert_array_equal(x['image'], y['image'])
  resumed.close()


@pytest.mark.parametrize('kwargs, message', [
    (dict(global_batch_size=6, shard_count=4), r'global_batch_size=6; expected a positive multiple of shard_count=4'),
    (dict(shard_index=2, shard_count=2), r'shard_index=2; expected 0 <= shard_index < shard_count=2'),
    (dict(train=False, eval_resize=30), r'eval_resize=30 is smaller than img_size=32'),
    (dict(train=False, num_epochs=2), r'num_epochs=2 given for evaluation'),
    (dict(worker_count=-1), r'worker_count=-1'),
    (dict(aug=aug_config(hflip=1.5)), r'aug.hflip=1.5; expected a probability in \[0, 1\]'),
    (dict(aug=aug_config(interpolation='nearest')), r"aug.interpolation='nearest'; expected one of"),
    (dict(aug=aug_config(rrc_scale=(0.5, 0.1))), r'aug.rrc_scale=\(0.5, 0.1\)'),
])
def test_bad_loader_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    loader(IndexedSource(4), **kwargs)


def test_unknown_aug_field():
  aug = aug_config()
  aug.hlfip = 0.5
  with pytest.raises(ValueError, match=r"aug fields \['hlfip'\] are unknown or missing"):
    loader(IndexedSource(4), aug=aug)


def test_every_interpolation_the_config_accepts_resamples():
  """aug.interpolation's allowed names come from the transforms' table: each one picks a PIL filter."""
  rng = np.random.default_rng(0)
  for name in transforms.INTERPOLATION_NAMES:
    pipeline.check_aug_config(aug_config(interpolation=name))
    assert transforms.pick_interpolation(name, rng) in transforms.INTERPOLATIONS.values()
