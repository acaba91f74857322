"""Offline demo dataset: scenes of real handwritten digits, for classification and segmentation.

The digits are the 1,797 real 8x8 scans that ship with scikit-learn (`load_digits`), so nothing is
downloaded. Each scene is written in a dark pen colour on light "paper": two random light colours
mixed by smooth noise and a gradient, plus pixel noise. Colour and texture vary from scene to
scene; the ink is always darker than the paper, as with real handwriting. (A first version drew
random ink colours on textured backgrounds of any brightness, and a small ViT stayed at chance on
it for its whole budget. Probes pointed at the changing ink-to-paper contrast: centred white
digits on random plain colours also stayed at chance, on black they were learned in 100 steps.)

Labelling. A scene holds one large *main* digit and 1 to 3 smaller *distractor* digits of other
classes, drawn under it:
  label  the main digit's class (10 classes): like ImageNet, one dominant object among clutter.
  mask   0 on background and 1 + class on the pixels of every digit (11 classes): the classes
         change within an image, so a model must classify each region from its own pixels;
         painting the image label on all the foreground gets the distractors wrong. That is the
         local evidence GAug is meant to favour.
The main digit is 44-62 % of the image side and distractors 25-34 %, so "largest" is never a close
call; it is drawn last, so it is never occluded.

Split. Scans are split per class, 80 % train and 20 % validation, before any scene is composed:
validation scenes contain only handwriting the training scenes never show.

Everything is a function of the seed. The dataset is built on first use as a TFDS ArrayRecord
dataset (no TensorFlow needed), one builder config per (image size, counts, seed), and then read
like any other TFDS source with `tfds.data_source(name, split=..., data_dir=...)`.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

NAME = 'locat_digit_scenes'
NUM_CLASSES = 10
NUM_SEG_CLASSES = NUM_CLASSES + 1  # background + one per digit class
SPLITS = ('train', 'validation')
VAL_FRACTION = 0.2
MAIN_SCALE = (0.44, 0.62)  # glyph side as a fraction of the image side
DISTRACTOR_SCALE = (0.25, 0.34)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, SIZE_STEP = 32, 96, 16
PAPER, INK = (0.65, 1.0), (0.0, 0.35)  # RGB ranges: ink always darker than paper
INK_THRESHOLD = 0.5  # glyph pixels with at least this opacity belong to the digit in the mask


@dataclasses.dataclass(eq=False)
class DigitScenesConfig(tfds.core.BuilderConfig):
  """One builder config per setting, so differently built datasets live side by side."""
  image_size: int = 64
  num_train: int = 8000
  num_val: int = 1000
  seed: int = 0

  @classmethod
  def of(cls, image_size: int, num_train: int, num_val: int, seed: int) -> 'DigitScenesConfig':
    name = f'px{image_size}_train{num_train}_val{num_val}_seed{seed}'
    return cls(name=name, image_size=image_size, num_train=num_train, num_val=num_val, seed=seed,
               description=f'{num_train}/{num_val} scenes of {image_size} px, seed {seed}.')


def split_scans(targets: np.ndarray, seed: int) -> dict[str, np.ndarray]:
  """Scan indices of each split: a seeded VAL_FRACTION of every class goes to validation."""
  rng = np.random.default_rng(seed)
  parts = {split: [] for split in SPLITS}
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(targets == c))
    n_val = int(round(VAL_FRACTION * len(idx)))
    parts['validation'].append(idx[:n_val])
    parts['train'].append(idx[n_val:])
  return {split: np.sort(np.concatenate(p)) for split, p in parts.items()}


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize of a float 2-D array to (size, size)."""
  img = Image.fromarray(plane.astype(np.float32))  # mode 'F'
  return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """(size, size, 3) float in [0, 1]: light paper, two colours mixed by smooth noise and a gradient."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  noise = _resize(rng.random((4, 4)), size)
  angle = rng.uniform(0, 2 * np.pi)
  gradient = np.cos(angle) * xx + np.sin(angle) * yy
  t = np.clip(0.8 * noise + 0.3 * gradient, 0, 1)
  c0, c1 = (rng.uniform(*PAPER, 3).astype(np.float32) for _ in range(2))
  return c0 + t[..., None] * (c1 - c0)


def _glyph(scan: np.ndarray, side: int) -> np.ndarray:
  """An 8x8 scan (0..16) upsampled to an opacity map (side, side) in [0, 1]."""
  ink = np.clip(_resize(scan / 16.0, side), 0, 1)
  return np.clip((ink - 0.2) / 0.5, 0, 1)  # sharper edges than the blurred upsampling


def _place(rng: np.random.Generator, side: int, size: int, taken: list[tuple[int, int, int]]):
  """Top-left corner for a side x side box, the least overlapping with `taken` of a few tries."""
  best, best_overlap = None, None
  for _ in range(8):
    y, x = rng.integers(0, size - side + 1, size=2)
    overlap = sum(max(0, min(y + side, ty + ts) - max(y, ty)) * max(0, min(x + side, tx + ts) - max(x, tx))
                  for ty, tx, ts in taken)
    if best is None or overlap < best_overlap:
      best, best_overlap = (int(y), int(x)), overlap
      if overlap == 0:
        break
  return best


def make_scene(rng: np.random.Generator, scans: np.ndarray, pools: list[np.ndarray], size: int) -> dict:
  """One scene: uint8 'image' (size, size, 3), 'mask' (size, size), 'label', 'scan_ids'.

  `scans` are the 8x8 scans (0..16) and `pools[c]` the indices of the scans of class c that this
  split may use. `scan_ids` lists the scans drawn, the main digit's first.
  """
  label = int(rng.integers(NUM_CLASSES))
  others = rng.permutation(np.delete(np.arange(NUM_CLASSES), label))[:rng.integers(1, 4)]
  classes = [*others, label]  # drawing order: distractors first, the main digit last and on top
  scales = [rng.uniform(*DISTRACTOR_SCALE) for _ in others] + [rng.uniform(*MAIN_SCALE)]
  ids = [int(rng.choice(pools[c])) for c in classes]

  canvas = _background(rng, size)
  mask = np.zeros((size, size), np.uint8)
  boxes = []  # the main digit is placed first so that it gets the free space
  for scale in scales[::-1]:
    side = max(4, int(round(scale * size)))
    boxes.append((*_place(rng, side, size, boxes), side))
  for c, scan, (y, x, side) in zip(classes, ids, boxes[::-1]):
    alpha = _glyph(scans[scan], side)
    box = canvas[y:y + side, x:x + side]
    ink = rng.uniform(*INK, 3).astype(np.float32)
    canvas[y:y + side, x:x + side] = box + (ink - box) * alpha[..., None]
    mask[y:y + side, x:x + side][alpha >= INK_THRESHOLD] = 1 + c
  canvas += 0.03 * rng.standard_normal(canvas.shape, np.float32)
  image = np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
  return {'image': image, 'mask': mask, 'label': label, 'scan_ids': np.array(ids[::-1], np.int32)}


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


class LocatDigitScenes(tfds.core.GeneratorBasedBuilder):
  """Scenes of sklearn's handwritten digits with image labels and masks (see the module docstring)."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.', '2.0.0': 'Dark pen on light paper (learnable in minutes).'}
  # TFDS finds this file through `importlib_resources`, a package it imports but declares only for
  # Python < 3.9; naming the file here keeps dataset building working without it.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(s, s, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            'mask': tfds.features.Image(shape=(s, s, 1), encoding_format='png'),
            'scan_ids': tfds.features.Tensor(shape=(None,), dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the scans ship with scikit-learn
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    from sklearn.datasets import load_digits  # seconds to import: only when building

    cfg = self.builder_config
    digits = load_digits()
    pool = split_scans(digits.target, cfg.seed)[split]
    pools = [pool[digits.target[pool] == c] for c in range(NUM_CLASSES)]
    count = cfg.num_train if split == 'train' else cfg.num_val
    for i in range(count):
      # One generator per scene: a scene depends on (seed, split, index) only.
      rng = np.random.default_rng((cfg.seed, SPLITS.index(split), i))
      scene = make_scene(rng, digits.images, pools, cfg.image_size)
      yield i, {'image': _png(scene['image']), 'mask': _png(scene['mask']),
                'label': scene['label'], 'scan_ids': scene['scan_ids']}


def build_demo_dataset(data_dir: str, *, image_size: int = 64, num_train: int = 8000, num_val: int = 1000,
                       seed: int = 0) -> str:
  """Builds the dataset in `data_dir` unless it is there; returns its name for `tfds.data_source`.

  Records: 'image' (s, s, 3) uint8, 'label' int, 'mask' (s, s, 1) uint8 (0 background, 1 + class),
  'scan_ids' int32 source scans; splits 'train' and 'validation'.
  """
  if not (MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE and image_size % SIZE_STEP == 0):
    raise ValueError(f'image_size={image_size}; expected a multiple of {SIZE_STEP} in '
                     f'{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}')
  for what, n, least in (('num_train', num_train, 1), ('num_val', num_val, 1), ('seed', seed, 0)):
    if not isinstance(n, int) or n < least:
      raise ValueError(f'{what}={n!r}; expected an integer >= {least}')
  config = DigitScenesConfig.of(image_size, num_train, num_val, seed)
  builder = LocatDigitScenes(config=config, data_dir=data_dir, file_format='array_record')
  # No GCS lookup: the data is generated here, and the machine may have no network.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return f'{NAME}/{config.name}:{LocatDigitScenes.VERSION}'
