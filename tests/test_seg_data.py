"""Segmentation data: layouts, label conventions, image/label alignment, crops, loaders, bad data."""

import io
import os

import cv2
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from locatvit_jax.data import seg_pipeline, seg_sources, seg_transforms, transforms

# Block colours that identify their class. They are corners of a cube, so no blend of others can
# equal one: wherever resampling leaves a pixel exactly one of them, its label is known.
CORNERS = [(r, g, b) for r in (40, 215) for g in (40, 215) for b in (40, 215)]
PALETTE = {**dict(zip(range(6), CORNERS)), 255: CORNERS[6]}
STORED_ADE = (0, 1, 150)  # unlabelled, first class, last class


def png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def block_example(rng, shape=(48, 64), block=8):
  """Piecewise-constant image and its label: resizing keeps block interiors exact."""
  grid = rng.choice(list(PALETTE), size=(shape[0] // block, shape[1] // block))
  label = np.kron(grid, np.ones((block, block), int)).astype(np.uint8)
  image = np.zeros(shape + (3,), np.uint8)
  for c, colour in PALETTE.items():
    image[label == c] = colour
  return image, label


def cfg(**kw):
  return ml_collections.ConfigDict(kw)


def write_ade20k(root, *, per_split=4, sizes=((40, 56), (48, 40), (36, 60), (44, 44))):
  """ADEChallengeData2016 layout; stored labels use 0 (unlabelled), 1 and 150 in vertical bands."""
  base = root / 'ADEChallengeData2016'
  for split in ('training', 'validation'):
    (base / 'images' / split).mkdir(parents=True)
    (base / 'annotations' / split).mkdir(parents=True)
    for i in range(per_split):
      h, w = sizes[i % len(sizes)]
      stored = np.zeros((h, w), np.uint8)
      stored[:, w // 3:2 * w // 3] = STORED_ADE[1]
      stored[:, 2 * w // 3:] = STORED_ADE[2]
      Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(base / 'images' / split / f'ADE_{i}.jpg')
      Image.fromarray(stored).save(base / 'annotations' / split / f'ADE_{i}.png')
  return root


@pytest.fixture
def ade_root(tmp_path):
  return write_ade20k(tmp_path)


# -- label conventions and layouts ----------------------------------------------------------------
def test_reduce_zero_label_and_identity_maps():
  ade = seg_sources.reduce_zero_label(150)
  np.testing.assert_array_equal(ade(np.array([[0, 1, 150, 255]], np.uint8), 'k'), [[255, 0, 149, 255]])
  coco = seg_sources.identity_labels(171)
  np.testing.assert_array_equal(coco(np.array([0, 170, 255], np.uint8), 'k'), [0, 170, 255])
  with pytest.raises(ValueError, match=r'some/label.png: label values \[151\] are out of range'):
    ade(np.array([3, 151], np.uint8), 'some/label.png')
  with pytest.raises(ValueError, match=r'values \[171\]'):
    coco(np.array([171], np.uint8), 'k')


def test_pcontext_and_cocostuff_layouts(tmp_path):
  voc = tmp_path / 'pc' / 'VOCdevkit' / 'VOC2010'
  for d in ('JPEGImages', 'SegmentationClassContext', 'ImageSets/SegmentationContext'):
    (voc / d).mkdir(parents=True)
  for name in ('2008_000002', '2008_000003', 'not_in_split'):
    Image.new('RGB', (8, 6)).save(voc / 'JPEGImages' / f'{name}.jpg')
    Image.fromarray(np.array([[0, 1, 59]] * 6, np.uint8).repeat(3, 1)[:, :8]).save(
        voc / 'SegmentationClassContext' / f'{name}.png')
  (voc / 'ImageSets/SegmentationContext/val.txt').write_text('2008_000003\n2008_000002\n')
  pc = seg_sources.segmentation_source(cfg(kind='pcontext', root=str(tmp_path / 'pc'), num_classes=59), 'val')
  assert len(pc) == 2 and pc[0]['key'].endswith('JPEGImages/2008_000003.jpg')
  np.testing.assert_array_equal(pc.label_map.lut[[0, 1, 59, 255]], [255, 0, 58, 255])

  coco = tmp_path / 'coco'
  (coco / 'images' / 'val2017').mkdir(parents=True)
  (coco / 'annotations' / 'val2017').mkdir(parents=True)
  Image.new('RGB', (8, 6)).save(coco / 'images/val2017/000000000139.jpg')
  Image.new('L', (8, 6)).save(coco / 'annotations/val2017/000000000139_labelTrainIds.png')
  Image.new('L', (8, 6)).save(coco / 'annotations/val2017/000000000139.png')  # raw ids: not read
  source = seg_sources.segmentation_source(cfg(kind='cocostuff', root=str(coco)), 'val2017')
  assert len(source) == 1 and source.num_classes == 171
  assert source[0]['mask_key'].endswith('000000000139_labelTrainIds.png')


def test_voc_layout_reads_the_split_lists_and_the_aug_labels(tmp_path):
  voc = tmp_path / 'VOCdevkit' / 'VOC2012'
  for d in ('JPEGImages', 'SegmentationClass', 'SegmentationClassAug', 'ImageSets/Segmentation'):
    (voc / d).mkdir(parents=True)
  for name in ('2007_000032', '2007_000033', '2008_000008'):
    Image.new('RGB', (8, 6)).save(voc / 'JPEGImages' / f'{name}.jpg')
    label = np.array([[0, 20, 255]] * 6, np.uint8).repeat(3, 1)[:, :8]
    Image.fromarray(label).save(voc / 'SegmentationClassAug' / f'{name}.png')
  Image.new('L', (8, 6)).save(voc / 'SegmentationClass' / '2007_000033.png')
  (voc / 'ImageSets/Segmentation/val.txt').write_text('2007_000033\n')
  (voc / 'ImageSets/Segmentation/aug.txt').write_text('2008_000008\n2007_000032\n')
  val = seg_sources.segmentation_source(cfg(kind='voc', root=str(tmp_path), num_classes=21), 'val')
  assert len(val) == 1 and val[0]['mask_key'].endswith('VOC2012/SegmentationClass/2007_000033.png')
  aug = seg_sources.segmentation_source(cfg(kind='voc', root=str(tmp_path)), 'aug')
  assert [os.path.basename(aug[i]['mask_key']) for i in range(2)] == ['2008_000008.png', '2007_000032.png']
  assert '/SegmentationClassAug/' in aug[0]['mask_key']
  np.testing.assert_array_equal(aug.label_map(np.array([0, 20, 255], np.uint8), 'k'), [0, 20, 255])
  with pytest.raises(FileNotFoundError, match=r'VOC2012/ImageSets/Segmentation/train.txt does not exist; '
                                              r'expected the layout in seg_sources.py'):
    seg_sources.segmentation_source(cfg(kind='voc', root=str(tmp_path)), 'train')
  with pytest.raises(ValueError, match=r"voc split 'trainaug'; expected one of "
                                       r"\('train', 'val', 'trainval', 'aug'\)"):
    seg_sources.segmentation_source(cfg(kind='voc', root=str(tmp_path)), 'trainaug')
  (voc / 'ImageSets/Segmentation/train.txt').write_text('2007_000032\n')
  with pytest.raises(FileNotFoundError, match=r'SegmentationClass/2007_000032.png is missing'):
    seg_sources.segmentation_source(cfg(kind='voc', root=str(tmp_path)), 'train')


def test_bad_configs_and_layouts(tmp_path, ade_root):
  with pytest.raises(ValueError, match=r"data.kind='cityscapes'; expected one of"):
    seg_sources.segmentation_source(cfg(kind='cityscapes', root='x'), 'train')
  with pytest.raises(ValueError, match='data.root is not set'):
    seg_sources.segmentation_source(cfg(kind='ade20k', root=None), 'training')
  with pytest.raises(ValueError, match=r"ade20k split 'train'; expected one of \('training', 'validation'\)"):
    seg_sources.segmentation_source(cfg(kind='ade20k', root=str(ade_root)), 'train')
  with pytest.raises(ValueError, match='data.num_classes=151 but ade20k:training has 150 classes'):
    seg_sources.segmentation_source(cfg(kind='ade20k', root=str(ade_root), num_classes=151), 'training')
  with pytest.raises(FileNotFoundError, match='ADE20K images folder .*/nowhere/ADEChallengeData2016'):
    seg_sources.segmentation_source(cfg(kind='ade20k', root=str(tmp_path / 'nowhere')), 'training')
  (tmp_path / 'pc/VOCdevkit/VOC2010/JPEGImages').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r'VOC2010/ImageSets/SegmentationContext/train.txt does not exist; '
                                              r'expected the layout in seg_sources.py'):
    seg_sources.segmentation_source(cfg(kind='pcontext', root=str(tmp_path / 'pc')), 'train')


# -- bad data: each error names the file --------------------------------------------------------------
def test_missing_label_fails_when_the_source_is_built(ade_root):
  os.remove(ade_root / 'ADEChallengeData2016/annotations/training/ADE_2.png')
  with pytest.raises(FileNotFoundError, match=r'annotations/training/ADE_2.png is missing; expected a '
                                              r'label PNG for image .*images/training/ADE_2.jpg'):
    seg_sources.ade20k_source(str(ade_root), 'training')


def test_size_mismatch_and_out_of_range_fail_when_decoded(ade_root):
  ann = ade_root / 'ADEChallengeData2016/annotations/training'
  Image.fromarray(np.ones((10, 12), np.uint8)).save(ann / 'ADE_1.png')
  Image.fromarray(np.full((44, 44), 200, np.uint8)).save(ann / 'ADE_3.png')
  source = seg_sources.ade20k_source(str(ade_root), 'training')
  decode = seg_transforms.DecodeExample(source.label_map)
  with pytest.raises(ValueError, match=r'annotations/training/ADE_1.png: label is 10x12 but image '
                                       r'.*images/training/ADE_1.jpg is 48x40; expected the same size'):
    decode.map(source[1])
  with pytest.raises(ValueError, match=r'annotations/training/ADE_3.png: label values \[200\] are out '
                                       r'of range; expected values that map to classes 0..149'):
    decode.map(source[3])
  # The loader surfaces the same error.
  loader = seg_pipeline.segmentation_train_loader(
      source, global_batch_size=4, crop_size=32, scale=(64, 32), ratio_range=(0.5, 2.0),
      label_map=source.label_map, seed=0, worker_count=0)
  with pytest.raises(ValueError, match='ADE_[13].png'):
    next(iter(loader))


def test_corrupt_files_are_skipped_and_counted(ade_root):
  """Bytes that are not an image, as image or as label: a counted stand-in whose pixels are all ignored."""
  base = ade_root / 'ADEChallengeData2016'
  for name in ('images/training/ADE_1.jpg', 'annotations/training/ADE_3.png', 'images/validation/ADE_2.jpg'):
    (base / name).write_bytes(b'these bytes are not an image')
  source = seg_sources.ade20k_source(str(ade_root), 'training')
  it = iter(train_loader(source))
  batches = [next(it) for _ in range(3)]  # a batch of 4 is one epoch of the 4 files
  for b in batches:
    assert b['skipped'].dtype == np.int32 and b['skipped'].sum() == 2
    assert np.all(b['mask'][b['skipped'] == 1] == 255)
    assert np.all((b['mask'][b['skipped'] == 0] != 255).any(axis=(1, 2)))
  val = seg_sources.ade20k_source(str(ade_root), 'validation')
  examples = list(seg_pipeline.segmentation_eval_examples(val, scale=(64, 32), label_map=val.label_map,
                                                          patch_size=16, num_threads=2))
  assert [int(ex['skipped']) for ex in examples] == [0, 0, 1, 0]


def test_rgb_label_png_is_rejected():
  record = {'image': png(np.zeros((4, 4, 3))), 'mask': png(np.zeros((4, 4, 3))), 'key': 'a.jpg',
            'mask_key': 'a.png'}
  with pytest.raises(ValueError, match=r'a.png: label PNG has mode RGB; expected a single-channel'):
    seg_transforms.DecodeExample(seg_sources.identity_labels(10)).map(record)


# -- transforms ------------------------------------------------------------------------------------
def test_fit_size_matches_mmcv_rescale():
  assert seg_transforms.fit_size(375, 500, (2048, 512)) == (512, 683)
  assert seg_transforms.fit_size(512, 4000, (2048, 512)) == (262, 2048)  # long side limits
  assert seg_transforms.fit_size(500, 333, (520, 520)) == (520, 346)


def test_geometric_train_steps_keep_image_and_label_aligned():
  """After resize, crop, flip and pad, every clean pixel's colour still names its label."""
  colours = np.array(list(PALETTE.values()), np.float32)
  classes = np.array(list(PALETTE))
  steps = [seg_transforms.RandomResize((64, 48), (0.5, 2.0)), seg_transforms.RandomCrop(32),
           seg_transforms.RandomFlip(0.5), seg_transforms.NormalizeAndPad(32)]
  label_map = seg_sources.identity_labels(6)
  for seed in range(12):
    rng = np.random.default_rng(seed)
    image, label = block_example(rng)
    ex = seg_transforms.DecodeExample(label_map).map(
        {'image': png(image), 'mask': png(label), 'key': 'k', 'mask_key': 'm'})
    for step in steps:
      ex = step.random_map(ex, rng) if hasattr(step, 'random_map') else step.map(ex)
    assert ex['image'].shape == (32, 32, 3) and ex['mask'].shape == (32, 32)
    assert ex['image'].dtype == np.float32 and ex['mask'].dtype == np.int32
    rgb = (ex['image'] * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN) * 255
    match = np.all(np.abs(rgb[:, :, None] - colours) < 1e-3, -1)  # (32, 32, palette)
    clean, colour = match.any(-1), match.argmax(-1)
    # Labels are sampled at floor(i * in / out) (mmcv's nearest), the image at pixel centres, so at a
    # block's edge a label may lag its colour by a pixel: compare where all 3x3 neighbours share a colour.
    inner = np.zeros_like(clean)
    inner[1:-1, 1:-1] = np.all([clean[y:y + 30, x:x + 30] & (colour[y:y + 30, x:x + 30] == colour[1:-1, 1:-1])
                                for y in range(3) for x in range(3)], 0)
    assert inner.mean() > 0.1  # measured 0.14-0.58 over the seeds; shrunk crops are mostly padding
    np.testing.assert_array_equal(ex['mask'][inner], classes[colour][inner])
    padded = np.all(np.abs(ex['image']) < 1e-6, -1)
    assert np.all(ex['mask'][padded] == 255)


def cat_ratio_mask():
  """32x128 label: class 0 on the left half; right half alternates 4 columns of class 1 and 4 ignored.
  A 32-px crop meets the 0.75 rule only if it straddles the middle with enough class 1."""
  mask = np.zeros((32, 128), np.uint8)
  right = np.where(np.arange(64) // 4 % 2 == 0, 1, 255).astype(np.uint8)
  mask[:, 64:] = right
  return mask


def largest_class_share(crop):
  counts = np.bincount(crop.ravel(), minlength=256)[:255]
  return counts.max() / max(counts.sum(), 1), np.count_nonzero(counts)


def test_random_crop_respects_cat_max_ratio():
  mask = cat_ratio_mask()
  ex = {'image': np.zeros((32, 128, 3), np.uint8), 'mask': mask}
  # Many tries so that failing every one is negligible; ignored pixels must not count as a class.
  crop = seg_transforms.RandomCrop(32, cat_max_ratio=0.75, max_tries=50)
  for seed in range(30):
    out = crop.random_map(ex, np.random.default_rng(seed))
    share, n = largest_class_share(out['mask'])
    assert out['mask'].shape == (32, 32) and n == 2 and share < 0.75
  unconstrained = [largest_class_share(seg_transforms.RandomCrop(32, cat_max_ratio=1.0).random_map(
      ex, np.random.default_rng(seed))['mask']) for seed in range(30)]
  assert sum(n < 2 or share >= 0.75 for share, n in unconstrained) > 10


def test_random_crop_keeps_small_images_whole():
  ex = {'image': np.zeros((20, 24, 3), np.uint8), 'mask': np.ones((20, 24), np.uint8)}
  out = seg_transforms.RandomCrop(32).random_map(ex, np.random.default_rng(0))
  assert out['image'].shape == (20, 24, 3) and out['mask'].shape == (20, 24)


def numpy_bilinear(image, size):
  """Bilinear resize with half-pixel centres, edges clamped, no antialiasing, in float64."""
  def axis_weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - (src - lo))
    np.add.at(m, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), src - lo)
    return m
  return np.einsum('ih,hwc,jw->ijc', axis_weights(image.shape[0], size[0]), image.astype(np.float64),
                   axis_weights(image.shape[1], size[1]))


# (h, w), scale -> mmcv.imrescale's size by hand: factor min(long / max(h, w), short / min(h, w)), each
# side int(side * factor + 0.5). Sides coprime with their new sizes, so floor(i * in / out) is never
# an exact integer but at 0, where OpenCV's floating point could round either way.
RESCALE = [((37, 53), (64, 32), (32, 46)),  # factor 32/37: 53 * 32/37 = 45.8 -> 46
           ((29, 91), (40, 24), (13, 40)),  # factor 40/91: 29 * 40/91 = 12.7 -> 13
           ((23, 31), (128, 96), (95, 128))]  # factor 128/31: 23 * 128/31 = 94.97 -> 95


@pytest.mark.parametrize('shape, scale, size', RESCALE)
def test_resize_follows_mmcv(shape, scale, size):
  """mmcv.imrescale with its cv2 backend: images bilinear without antialiasing (within OpenCV's
  fixed-point rounding), labels by OpenCV's nearest, which takes source pixel floor(i * in / out)."""
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
  label = rng.integers(0, 150, shape, dtype=np.uint8)
  out = seg_transforms.RandomResize(scale, (1.0, 1.0)).random_map({'image': image, 'mask': label}, rng)
  assert out['image'].shape == (*size, 3) and out['image'].dtype == np.uint8 and out['mask'].shape == size
  assert np.abs(out['image'] - numpy_bilinear(image, size)).max() <= 1
  rows, cols = np.arange(size[0]) * shape[0] // size[0], np.arange(size[1]) * shape[1] // size[1]
  np.testing.assert_array_equal(out['mask'], label[rows][:, cols])
  example = {'image': image, 'mask': label, 'skipped': np.int32(0)}
  assert tuple(seg_transforms.EvalResizeAndPad(scale, 16).map(example)['valid_size']) == size


class FixedDraws:
  """Stands in for the random stream: coins from `coins` in turn, each uniform draw `at` of the way
  along its range, the hue shift `hue`."""

  def __init__(self, coins, at, hue):
    self.coins, self.at, self.hue = list(coins), at, hue

  def integers(self, low, high=None):
    return self.coins.pop(0) if high is None else self.hue

  def uniform(self, low, high):
    return low + self.at * (high - low)


def mmseg_convert(x, alpha=1.0, beta=0.0):
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


@pytest.mark.parametrize('contrast_first', [1, 0])
def test_photometric_distortion_is_mmsegs_in_uint8(contrast_first):
  """Every step on: mmseg's PhotoMetricDistortion on the BGR image, in uint8 after every step, with
  OpenCV's uint8 HSV (hue 0-179). Draws at 0.8: brightness +19.2, contrast and saturation x1.3."""
  image = np.random.default_rng(5).integers(0, 256, (9, 11, 3), dtype=np.uint8)
  coins = [1, contrast_first, 1, 1, 1]  # brightness, the order, then contrast, saturation and hue each on
  out = seg_transforms.PhotoMetricDistortion().random_map({'image': image}, FixedDraws(coins, 0.8, -7))['image']
  bgr = mmseg_convert(image[..., ::-1], beta=19.2)
  if contrast_first:
    bgr = mmseg_convert(bgr, alpha=1.3)
  hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)  # saturation: to HSV and back
  hsv[..., 1] = mmseg_convert(hsv[..., 1], alpha=1.3)
  bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)  # hue: to HSV and back again
  hsv[..., 0] = (hsv[..., 0].astype(int) - 7) % 180
  bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if not contrast_first:
    bgr = mmseg_convert(bgr, alpha=1.3)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, bgr[..., ::-1])


def test_photometric_distortion_changes_colours_only():
  image, label = block_example(np.random.default_rng(0))
  distort = seg_transforms.PhotoMetricDistortion()
  changed = 0
  for seed in range(8):
    out = distort.random_map({'image': image, 'mask': label}, np.random.default_rng(seed))
    assert out['image'].dtype == np.uint8 and out['image'].shape == image.shape
    assert out['mask'] is label
    changed += not np.array_equal(out['image'], image)
    again = distort.random_map({'image': image, 'mask': label}, np.random.default_rng(seed))
    np.testing.assert_array_equal(again['image'], out['image'])
  assert changed >= 6  # each step has probability 1/2; all four skipped has probability 1/16


# -- loaders -------------------------------------------------------------------------------------
def train_loader(source, **kw):
  args = dict(global_batch_size=4, crop_size=32, scale=(64, 32), ratio_range=(0.5, 2.0),
              label_map=source.label_map, seed=3, worker_count=0)
  return seg_pipeline.segmentation_train_loader(source, **{**args, **kw})


def test_ade20k_folder_train_loader(ade_root):
  source = seg_sources.segmentation_source(cfg(kind='ade20k', root=str(ade_root), num_classes=150),
                                           'training')
  it = iter(train_loader(source))
  batches = [next(it) for _ in range(3)]  # 3 batches of 4 from 4 examples: the loader repeats
  for b in batches:
    assert b['image'].shape == (4, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['mask'].shape == (4, 32, 32) and b['mask'].dtype == np.int32
  values = set(np.unique(np.stack([b['mask'] for b in batches])).tolist())
  assert values == {0, 149, 255}  # reduce-zero-label: stored 1 -> 0, 150 -> 149, 0 -> 255 (and padding)

  # Resumable: a restored iterator continues with the same batches.
  it = iter(train_loader(source))
  next(it)
  state = it.get_state()
  expected = next(it)
  resumed = iter(train_loader(source))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['image'], expected['image'])

  # Per-process shards: half the global batch each.
  half = next(iter(train_loader(source, shard_index=1, shard_count=2)))
  assert half['image'].shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match='global_batch_size=5 is not divisible by 2 shards'):
    train_loader(source, global_batch_size=5, shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match=r'ratio_range=\(2.0, 0.5\); expected two ratios 0 < low <= high'):
    train_loader(source, ratio_range=(2.0, 0.5))
  with pytest.raises(ValueError, match=r'scale=\(512,\); expected two positive integers'):
    train_loader(source, scale=(512,))
  with pytest.raises(ValueError, match=r'shard_index=2; expected 0 <= shard_index < shard_count=2'):
    train_loader(source, shard_index=2, shard_count=2)


def test_worker_processes_give_the_same_batches(ade_root):
  source = seg_sources.ade20k_source(str(ade_root), 'training')
  in_process = iter(train_loader(source))
  with_workers = iter(train_loader(source, worker_count=1))
  for _ in range(2):
    a, b = next(in_process), next(with_workers)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['mask'], b['mask'])


def test_ade20k_folder_eval_examples(ade_root):
  source = seg_sources.ade20k_source(str(ade_root), 'validation')
  examples = list(seg_pipeline.segmentation_eval_examples(
      source, scale=(64, 32), label_map=source.label_map, patch_size=16, num_threads=2))
  assert len(examples) == 4
  for i, ex in enumerate(examples):
    stored = np.asarray(Image.open(source[i]['mask_key']))
    np.testing.assert_array_equal(ex['label'], source.label_map.lut[stored])  # original resolution
    h, w = ex['valid_size']
    assert (h, w) == seg_transforms.fit_size(*stored.shape, (64, 32)) and min(h, w) == 32
    assert ex['image'].shape[0] % 16 == 0 and ex['image'].shape[1] % 16 == 0
    assert ex['image'].shape[0] - h < 16 and ex['image'].shape[1] - w < 16
    assert np.all(ex['image'][h:] == 0) and np.all(ex['image'][:, w:] == 0)
    assert ex['original_image'].shape == stored.shape + (3,)
  # Two shards split the images between them.
  shards = [list(seg_pipeline.segmentation_eval_examples(
      source, scale=(64, 32), label_map=source.label_map, patch_size=16, shard_index=i, shard_count=2))
      for i in range(2)]
  assert [len(s) for s in shards] == [2, 2]
  with pytest.raises(ValueError, match='patch_size=0; expected a positive integer'):
    seg_pipeline.segmentation_eval_examples(source, scale=(64, 32), label_map=source.label_map,
                                            patch_size=0)
  np.testing.assert_array_equal(shards[1][0]['label'], examples[1]['label'])


# -- TFDS ------------------------------------------------------------------------------------------
TFDS_CFG = dict(kind='tfds_ade20k', data_dir=None, num_classes=100)


def test_mock_tfds_scene_parse150_source():
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    source = seg_sources.segmentation_source(cfg(**TFDS_CFG), 'train')
    example = source[1]
  assert len(source) == 3 and example['key'] == 'scene_parse150:train[1]'
  assert example['image'].dtype == np.uint8 and example['image'].shape[-1] == 3
  assert example['mask'].dtype == np.uint8 and example['mask'].ndim == 2  # the red channel
  # TFDS's random mock draws the image and the annotation at different sizes: caught on decode.
  with pytest.raises(ValueError, match=r'scene_parse150:train\[1\] annotation: label is \d+x\d+ but'):
    seg_transforms.DecodeExample(source.label_map).map(example)
  with pytest.raises(ValueError, match=r"tfds_ade20k split 'validation'; expected one of"):
    seg_sources.segmentation_source(cfg(**TFDS_CFG), 'validation')


def test_tfds_scene_parse150_through_the_loaders():
  """tfds.data_source mocked with consistent examples of the real features (RGB annotation PNGs)."""
  rng = np.random.default_rng(0)
  shapes = [(40, 48), (36, 52), (48, 48), (44, 40)]
  annotations = [rng.integers(0, 101, s + (3,), dtype=np.uint8) for s in shapes]
  examples = [{'image': rng.integers(0, 256, s + (3,), dtype=np.uint8), 'annotation': a}
              for s, a in zip(shapes, annotations)]
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: examples):
    source = seg_sources.segmentation_source(cfg(**TFDS_CFG), 'train')
  batch = next(iter(train_loader(source)))
  assert batch['mask'].shape == (4, 32, 32) and batch['mask'].max() == 255
  assert batch['mask'][batch['mask'] != 255].max() <= 99
  evals = list(seg_pipeline.segmentation_eval_examples(source, scale=(64, 32), label_map=source.label_map,
                                                       patch_size=16))
  np.testing.assert_array_equal(evals[2]['label'], source.label_map.lut[annotations[2][..., 0]])
