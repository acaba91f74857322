"""Grain transforms for segmentation: mmsegmentation's ADE20K pipeline on NumPy arrays (spec section 6).

Every geometric step moves the image and its label together; images are resampled bilinearly, labels
by nearest neighbour, so a label value is always one that was stored. Steps, in mmseg's order:

  train: DecodeExample -> RandomResize -> RandomCrop (cat_max_ratio) -> RandomFlip
         -> PhotoMetricDistortion -> NormalizeAndPad (image 0, label 255, to the crop size)
  eval:  DecodeExample -> EvalResizeAndPad (fit the scale, pad bottom/right to the patch multiple)

Resizing and colour conversions call OpenCV as mmcv does (cv2.resize INTER_LINEAR for images, without
antialiasing; INTER_NEAREST for labels, which samples at floor(i * in / out), not at pixel centres;
cvtColor for HSV), and the image stays uint8 through the photometric steps, truncated after each as
mmseg's PhotoMetricDistortion does, so the pixels are mmseg's for the same random draws. Images are
decoded by PIL, where mmseg decodes them with OpenCV.
"""

from __future__ import annotations

import io

import cv2
import grain
import numpy as np
from absl import logging
from PIL import Image

from locatvit_jax.data import transforms
from locatvit_jax.data.seg_sources import IGNORE_INDEX, LabelMap

# No OpenCV thread pool inside each Grain worker, which would oversubscribe the cores; mmseg's
# setup_multi_processes sets the same (opencv_num_threads=0).
cv2.setNumThreads(0)


# -- decoding --------------------------------------------------------------------------------------
class UndecodableError(ValueError):
  """A file that is not an image (corrupt, truncated): skipped and counted, unlike a wrong label."""


def decode_rgb(data, key: str) -> np.ndarray:
  """Encoded bytes or a decoded uint8 array -> uint8 (H, W, 3) RGB."""
  try:
    return np.asarray(transforms.to_rgb(data))
  except transforms.DECODE_ERRORS as e:
    raise UndecodableError(f'{key}: cannot decode the image ({e})') from e


def decode_label(data, key: str) -> np.ndarray:
  """Encoded PNG bytes or a uint8 (H, W) array -> uint8 (H, W) stored label values."""
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim != 2:
      raise ValueError(f'{key}: label array is {data.dtype}{list(data.shape)}; expected uint8 (H, W)')
    return data
  try:
    with Image.open(io.BytesIO(data)) as image:
      mode, stored = image.mode, np.asarray(image)
  except transforms.DECODE_ERRORS as e:
    raise UndecodableError(f'{key}: cannot decode the label ({e})') from e
  # 'P' (palette) PNGs store class indices too; their palette is only for viewing.
  if mode not in ('L', 'P'):
    raise ValueError(f'{key}: label PNG has mode {mode}; expected a single-channel (L or P) PNG of '
                     'class indices')
  return stored


class DecodeExample(grain.transforms.Map):
  """Source record -> {'image': uint8 (H, W, 3), 'mask': uint8 (H, W) classes or 255, 'skipped': int32}.

  As in classification, a corrupt file must not stop a long run: an image or label that cannot be
  decoded is logged with its name and replaced by a 1-pixel stand-in labelled IGNORE_INDEX, which
  adds nothing to the loss or the metric, with 'skipped' 1 (else 0) for the trainer and the evaluation
  to count. A label that decodes but breaks the dataset's conventions (size, mode, values) still fails.
  """

  def __init__(self, label_map: LabelMap):
    self.label_map = label_map

  def map(self, record: dict) -> dict:
    try:
      image = decode_rgb(record['image'], record['key'])
      stored = decode_label(record['mask'], record['mask_key'])
    except UndecodableError as e:
      logging.warning('Skipping a corrupt example: %s', e)
      return {'image': np.zeros((1, 1, 3), np.uint8), 'mask': np.full((1, 1), IGNORE_INDEX, np.uint8),
              'skipped': np.int32(1)}
    if image.shape[:2] != stored.shape:
      raise ValueError(f'{record["mask_key"]}: label is {stored.shape[0]}x{stored.shape[1]} but image '
                       f'{record["key"]} is {image.shape[0]}x{image.shape[1]}; expected the same size')
    return {'image': image, 'mask': self.label_map(stored, record['mask_key']), 'skipped': np.int32(0)}


# -- geometry --------------------------------------------------------------------------------------
def fit_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
  """mmcv's keep-ratio rescale: the largest size with long side <= max(scale), short <= min(scale)."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """mmcv.imresize(interpolation='bilinear') with its default cv2 backend; size is (h, w)."""
  return cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)


def resize_label(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """mmcv.imresize(interpolation='nearest'), as mmseg resizes label maps; size is (h, w)."""
  return cv2.resize(mask, size[::-1], interpolation=cv2.INTER_NEAREST)


def normalize(image: np.ndarray) -> np.ndarray:
  return transforms.normalize(image, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)


def pad_bottom_right(array: np.ndarray, size: tuple[int, int], value) -> np.ndarray:
  pad = [(0, size[0] - array.shape[0]), (0, size[1] - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
  return np.pad(array, pad, constant_values=value)


class RandomResize(grain.transforms.RandomMap):
  """mmseg RandomResize(scale, ratio_range, keep_ratio=True): fit `scale` x U(ratio_range)."""

  def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float]):
    self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    ratio = rng.uniform(*self.ratio_range)
    target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
    size = fit_size(*example['mask'].shape, target)
    return {**example, 'image': resize_image(example['image'], size), 'mask': resize_label(example['mask'], size)}


class RandomCrop(grain.transforms.RandomMap):
  """mmseg RandomCrop: a crop_size square (smaller if the image is), redrawn up to `max_tries`
  times while one class covers >= cat_max_ratio of the crop's labelled pixels or it holds one class."""

  def __init__(self, crop_size: int, cat_max_ratio: float = 0.75, max_tries: int = 10):
    self.crop_size, self.cat_max_ratio, self.max_tries = crop_size, cat_max_ratio, max_tries

  def _corner(self, shape, rng) -> tuple[int, int]:
    return tuple(int(rng.integers(0, max(s - self.crop_size, 0) + 1)) for s in shape)

  def _balanced(self, crop: np.ndarray) -> bool:
    counts = np.bincount(crop.ravel(), minlength=256)[:IGNORE_INDEX]  # ignored pixels do not count
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    mask, c = example['mask'], self.crop_size
    top, left = self._corner(mask.shape, rng)
    if self.cat_max_ratio < 1.0:
      for _ in range(self.max_tries):
        if self._balanced(mask[top:top + c, left:left + c]):
          break
        top, left = self._corner(mask.shape, rng)
    return {**example, 'image': example['image'][top:top + c, left:left + c],
            'mask': mask[top:top + c, left:left + c]}


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip of image and label together with probability `prob`."""

  def __init__(self, prob: float = 0.5):
    self.prob = prob

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    if rng.random() < self.prob:
      return {**example, 'image': example['image'][:, ::-1], 'mask': example['mask'][:, ::-1]}
    return example


# -- colour ----------------------------------------------------------------------------------------
def scale_and_shift(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """uint8 -> uint8: image * alpha + beta in float32, clipped to [0, 255] and truncated, as mmseg's
  PhotoMetricDistortion.convert does after every step."""
  return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def scale_saturation(image: np.ndarray, alpha: float) -> np.ndarray:
  """In OpenCV's uint8 HSV (saturation 0-255), the saturation scaled by `alpha` and truncated."""
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[..., 1] = scale_and_shift(hsv[..., 1], alpha)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def shift_hue(image: np.ndarray, delta: int) -> np.ndarray:
  """In OpenCV's uint8 HSV (hue 0-179, 2 degrees a unit), the hue shifted by `delta` units."""
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[..., 0] = (hsv[..., 0].astype(np.int32) + delta) % 180
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


class PhotoMetricDistortion(grain.transforms.RandomMap):
  """mmseg PhotoMetricDistortion on a uint8 RGB image: brightness, contrast, saturation, hue, each
  applied with probability 0.5, each rounding back to uint8; a coin puts contrast before or after
  the HSV steps, which convert to HSV and back each on its own. Image only; uint8 out.

  Our images are RGB where mmseg's are BGR; RGB2HSV of one is BGR2HSV of the other, and the rest is
  the same on every channel. The draws come in mmseg's order from our own random stream.
  """

  def __init__(self, brightness_delta: float = 32, contrast_range=(0.5, 1.5),
               saturation_range=(0.5, 1.5), hue_delta: int = 18):
    self.brightness_delta = brightness_delta
    self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)
    self.hue_delta = hue_delta

  def _contrast(self, image, rng):
    if rng.integers(2):
      image = scale_and_shift(image, alpha=rng.uniform(*self.contrast_range))
    return image

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    image = example['image']
    if rng.integers(2):
      image = scale_and_shift(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
    contrast_first = rng.integers(2)
    if contrast_first:
      image = self._contrast(image, rng)
    if rng.integers(2):
      image = scale_saturation(image, rng.uniform(*self.saturation_range))
    if rng.integers(2):  # the hue shift's high end is excluded, as in mmseg (numpy's randint)
      image = shift_hue(image, int(rng.integers(-self.hue_delta, self.hue_delta)))
    if not contrast_first:
      image = self._contrast(image, rng)
    return {**example, 'image': image}


# -- output ----------------------------------------------------------------------------------------
class NormalizeAndPad(grain.transforms.Map):
  """Normalises, then pads to (size, size): image with 0 (after normalising), label with 255."""

  def __init__(self, size: int):
    self.size = size

  def map(self, example: dict) -> dict:
    size = (self.size, self.size)
    return {**example, 'image': pad_bottom_right(normalize(example['image']), size, 0.0),
            'mask': pad_bottom_right(example['mask'], size, IGNORE_INDEX).astype(np.int32)}


class EvalResizeAndPad(grain.transforms.Map):
  """Fits the image to `scale` (keeping its ratio), normalises and pads bottom/right to a multiple of
  `patch_size`. Keeps the original image and label: the metric is taken at the label's resolution."""

  def __init__(self, scale: tuple[int, int], patch_size: int):
    self.scale, self.patch_size = tuple(scale), patch_size

  def map(self, example: dict) -> dict:
    image, label = example['image'], example['mask']
    h, w = fit_size(*label.shape, self.scale)
    p = self.patch_size
    padded = (-(-h // p) * p, -(-w // p) * p)
    return {'image': pad_bottom_right(normalize(resize_image(image, (h, w))), padded, 0.0),
            'valid_size': np.array([h, w], np.int32),
            'label': label.astype(np.int32),
            'original_image': image,
            'skipped': example['skipped']}


def train_transforms(label_map: LabelMap, *, crop_size: int, scale, ratio_range,
                     cat_max_ratio: float = 0.75) -> list:
  return [DecodeExample(label_map), RandomResize(scale, ratio_range),
          RandomCrop(crop_size, cat_max_ratio), RandomFlip(0.5), PhotoMetricDistortion(),
          NormalizeAndPad(crop_size)]
