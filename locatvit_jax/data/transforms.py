"""Per-example image transforms of timm's ImageNet recipe (spec section 5), as Grain transforms.

Train: random resized crop -> horizontal flip -> RandAugment -> normalise. Random erasing follows
mixup in the train step (train/mixup.py), as with timm's prefetching loader.
Eval: resize the short side (bicubic) -> centre crop -> normalise.

All randomness comes from the `np.random.Generator` Grain derives from the seed and the example's
index, so an example's augmentation does not depend on worker count, threads or timing. The
sampling follows timm's code step by step, with that generator in place of Python's `random`.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import grain
import numpy as np
from absl import logging
from PIL import Image, ImageEnhance, ImageOps

INTERPOLATIONS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
# timm's 'random' interpolation: each resize picks one of the above.
RANDOM_INTERPOLATION = tuple(INTERPOLATIONS.values())
INTERPOLATION_NAMES = (*INTERPOLATIONS, 'random')  # what aug.interpolation may be
# What PIL raises on truncated, corrupt or absurdly large files.
# ImageNet statistics of [0, 1] RGB; on 0-255 RGB they are the spec's (123.675, 116.28, 103.53) /
# (58.395, 57.12, 57.375). The segmentation recipe and some model families normalise with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# -- decoding ----------------------------------------------------------------------------------------
def to_rgb(image) -> Image.Image:
  """A PIL image, encoded bytes or a decoded uint8 array (H, W[, C]) -> RGB PIL image (grey/CMYK/alpha
  converted)."""
  if isinstance(image, Image.Image):
    return image.convert('RGB')
  if isinstance(image, np.ndarray):
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    return Image.fromarray(image).convert('RGB')
  with Image.open(io.BytesIO(image)) as img:
    return img.convert('RGB')


class DecodeImage(grain.transforms.Map):
  """Source record -> {'image': RGB PIL image, or None when undecodable, 'label', 'key'}.

  A corrupt image must not stop a multi-day run: it is logged with its key and marked None, and
  the pipeline drops it (train) or masks it out (eval) and counts it in the batch's 'skipped'.
  """

  def map(self, record: dict) -> dict:
    try:
      image = to_rgb(record['image'])
    except DECODE_ERRORS as e:
      logging.warning('Skipping corrupt image %s: %s', record['key'], e)
      image = None
    return {'image': image, 'label': record['label'], 'key': record['key']}


# -- geometry ----------------------------------------------------------------------------------------
def pick_interpolation(name: str, rng: np.random.Generator) -> int:
  if name == 'random':
    return RANDOM_INTERPOLATION[rng.integers(len(RANDOM_INTERPOLATION))]
  return INTERPOLATIONS[name]


def random_resized_crop_box(width: int, height: int, scale, ratio, rng) -> tuple[int, int, int, int]:
  """(left, top, w, h) of timm's RandomResizedCrop: 10 tries at a random area fraction and log-uniform
  aspect ratio, then a centre crop clamped to the ratio range."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if w <= width and h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(image: Image.Image, size: int, scale, ratio, interpolation: str, rng) -> Image.Image:
  left, top, w, h = random_resized_crop_box(*image.size, scale, ratio, rng)
  crop = image.crop((left, top, left + w, top + h))
  return crop.resize((size, size), pick_interpolation(interpolation, rng))


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
  """Bicubic resize so the short side is `size` (torchvision's Resize(int): long side truncated)."""
  width, height = image.size
  if width <= height:
    new = (size, int(size * height / width))
  else:
    new = (int(size * width / height), size)
  return image.resize(new, Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  width, height = image.size
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


# -- RandAugment (timm's rand-m9-mstd0.5-inc1) ---------------------------------------------------------
def _affine(image, matrix, fill, resample):
  return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(image, add):
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return image.point(lut * 3)


def _posterize(image, bits):
  if bits >= 8:
    return image
  if bits <= 0:  # timm's increasing level reaches 0 bits at magnitude 10; Pillow < 9 made that black
    return Image.new(image.mode, image.size)
  return ImageOps.posterize(image, bits)


# The PIL calls are timm's. Pixel ops take (image, argument); geometric ops also (fill, resample).
_PIXEL_OPS: dict[str, Callable] = {
    'AutoContrast': lambda img, _: ImageOps.autocontrast(img),
    'Equalize': lambda img, _: ImageOps.equalize(img),
    'Invert': lambda img, _: ImageOps.invert(img),
    'Posterize': _posterize,
    'Solarize': ImageOps.solarize,
    'SolarizeAdd': _solarize_add,
    'Color': lambda img, f: ImageEnhance.Color(img).enhance(f),
    'Contrast': lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    'Brightness': lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    'Sharpness': lambda img, f: ImageEnhance.Sharpness(img).enhance(f),
}
_GEOMETRIC_OPS: dict[str, Callable] = {
    'Rotate': lambda img, deg, fill, res: img.rotate(deg, resample=res, fillcolor=fill),
    'ShearX': lambda img, f, fill, res: _affine(img, (1, f, 0, 0, 1, 0), fill, res),
    'ShearY': lambda img, f, fill, res: _affine(img, (1, 0, 0, f, 1, 0), fill, res),
    'TranslateXRel': lambda img, pct, fill, res: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, res),
    'TranslateYRel': lambda img, pct, fill, res: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, res),
}
# timm's op list and order (its Cutout is left out there too: random erasing replaces it).
RAND_AUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
                    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
                    'TranslateYRel')


def _signed(value: float, rng) -> float:
  return -value if rng.random() > 0.5 else value


def _enhance(m, rng):
  return m / 10 * 1.8 + 0.1


def _enhance_increasing(m, rng):
  # 1.0 is the identity; stronger magnitudes move further towards 0 or 2.
  return max(0.1, 1.0 + _signed(m / 10 * 0.9, rng))


# Magnitude m in [0, 10] -> op argument (ops without one get None). In the 'increasing' set every op
# gets stronger with m; in the original set posterize, solarize and the enhancements do not.
_LEVEL_TO_ARG: dict[str, Callable] = {
    'Rotate': lambda m, rng: _signed(m / 10 * 30.0, rng),
    'Posterize': lambda m, rng: int(m / 10 * 4),
    'Solarize': lambda m, rng: int(m / 10 * 256),
    'SolarizeAdd': lambda m, rng: int(m / 10 * 110),
    'Color': _enhance, 'Contrast': _enhance, 'Brightness': _enhance, 'Sharpness': _enhance,
    'ShearX': lambda m, rng: _signed(m / 10 * 0.3, rng),
    'ShearY': lambda m, rng: _signed(m / 10 * 0.3, rng),
    'TranslateXRel': lambda m, rng: _signed(m / 10 * 0.45, rng),
    'TranslateYRel': lambda m, rng: _signed(m / 10 * 0.45, rng),
}
_INCREASING_LEVEL_TO_ARG = dict(
    _LEVEL_TO_ARG,
    Posterize=lambda m, rng: 4 - int(m / 10 * 4),
    Solarize=lambda m, rng: 256 - int(m / 10 * 256),
    Color=_enhance_increasing, Contrast=_enhance_increasing, Brightness=_enhance_increasing,
    Sharpness=_enhance_increasing)


def apply_op(image: Image.Image, name: str, magnitude: float, rng: np.random.Generator, *,
             increasing: bool = True, fill=(128, 128, 128), interpolation: str = 'random') -> Image.Image:
  """One RandAugment op at magnitude in [0, 10] (random sign and interpolation drawn from rng)."""
  level_to_arg = (_INCREASING_LEVEL_TO_ARG if increasing else _LEVEL_TO_ARG).get(name)
  arg = level_to_arg(magnitude, rng) if level_to_arg else None
  if name in _GEOMETRIC_OPS:
    return _GEOMETRIC_OPS[name](image, arg, fill, pick_interpolation(interpolation, rng))
  return _PIXEL_OPS[name](image, arg)


def rand_augment(image: Image.Image, rng: np.random.Generator, *, num_ops: int, magnitude: float,
                 magnitude_std: float, increasing: bool, fill: tuple[int, int, int],
                 interpolation: str) -> Image.Image:
  """timm's RandAugment: `num_ops` ops drawn with replacement, each applied with probability 0.5 at
  a magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10]."""
  for i in rng.integers(len(RAND_AUGMENT_OPS), size=num_ops):
    if rng.random() > 0.5:
      continue
    m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
    image = apply_op(image, RAND_AUGMENT_OPS[i], max(0.0, min(m, 10.0)), rng, increasing=increasing,
                     fill=fill, interpolation=interpolation)
  return image


# -- tensors -----------------------------------------------------------------------------------------
def normalize(image, mean, std) -> np.ndarray:
  """uint8 RGB (PIL image or array) -> float32 (H, W, 3): (x / 255 - mean) / std, as ToTensor + Normalize."""
  x = np.asarray(image, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def eval_transform(image: Image.Image, size: int, resize: int, mean, std) -> np.ndarray:
  """The evaluation recipe on one RGB image: float32 (size, size, 3). `locatvit_jax.preprocess` uses it too."""
  return normalize(center_crop(resize_short_side(image, resize), size), mean, std)


# -- the two recipes as Grain transforms ----------------------------------------------------------------
class TrainAugment(grain.transforms.RandomMap):
  """Decoded record -> {'image': float32 (size, size, 3), 'label', 'key'}; undecodable images pass as None.

  `aug` has the fields of `pipeline.default_aug_config()`.
  """

  def __init__(self, size: int, aug):
    self.size = size
    self.aug = dict(aug)
    # RandAugment fills uncovered pixels with the mean colour, as timm does.
    self.fill = tuple(min(255, round(255 * m)) for m in self.aug['mean'])

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, a = record['image'], self.aug
    if image is None:
      return record
    image = random_resized_crop(image, self.size, a['rrc_scale'], a['rrc_ratio'], a['interpolation'], rng)
    if rng.random() < a['hflip']:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = rand_augment(image, rng, num_ops=a['randaug_num_ops'], magnitude=a['randaug_magnitude'],
                         magnitude_std=a['randaug_magnitude_std'], increasing=a['randaug_increasing'],
                         fill=self.fill, interpolation=a['interpolation'])
    return {**record, 'image': normalize(image, a['mean'], a['std'])}


class EvalPreprocess(grain.transforms.Map):
  """Decoded record -> {'image', 'label', 'valid', 'skipped'}; an undecodable image becomes zeros
  with valid 0 and skipped 1, so evaluation still sees every index exactly once."""

  def __init__(self, size: int, resize: int, mean, std):
    self.size, self.resize, self.mean, self.std = size, resize, tuple(mean), tuple(std)

  def map(self, record: dict) -> dict:
    if record['image'] is None:
      return {'image': np.zeros((self.size, self.size, 3), np.float32), 'label': np.int32(record['label']),
              'valid': np.int32(0), 'skipped': np.int32(1)}
    image = eval_transform(record['image'], self.size, self.resize, self.mean, self.std)
    return {'image': image, 'label': np.int32(record['label']), 'valid': np.int32(1), 'skipped': np.int32(0)}
