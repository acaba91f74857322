"""DINO's multi-crop augmentation (DataAugmentationDINO of facebookresearch/dino) as a Grain pipeline.

Every image gives 2 global crops and `num_local` local crops, each its own chain:
  RandomResizedCrop(size, scale, ratio 3/4..4/3, bicubic) -> horizontal flip (0.5) ->
  colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; probability 0.8, the four in
  random order) -> grayscale (0.2) -> Gaussian blur, radius U(0.1, 2) (probability: global 1 1.0,
  global 2 0.1, local 0.5) -> solarisation at 128 (global 2 only, 0.2) -> normalise (ImageNet mean/std).
Batches are {'global': float32 (b, 2, G, G, 3), 'local': float32 (b, num_local, L, L, 3)}: two static
shapes, so the train step compiles once.

The PIL operations are torchvision's (ColorJitter's adjust_* on PIL images, RandomGrayscale's three
equal channels, PIL's GaussianBlur and ImageOps.solarize). The randomness comes from the generator
Grain derives from the seed and the example's index (as data/transforms.py), so a resumed run draws
the same crops. Undecodable images are logged (transforms.DecodeImage) and left out.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from locatvit_jax.data import pipeline, transforms
from locatvit_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# DINO's per-view blur and solarisation probabilities: global view 1, global view 2, every local view.
GLOBAL1 = dict(blur=1.0, solarize=0.0)
GLOBAL2 = dict(blur=0.1, solarize=0.2)
LOCAL = dict(blur=0.5, solarize=0.0)


def default_crops_config() -> ml_collections.ConfigDict:
  """DINO's defaults (main_dino.py and DataAugmentationDINO)."""
  return ml_collections.ConfigDict(dict(
      global_size=224, global_scale=(0.4, 1.0), local_size=96, local_scale=(0.05, 0.4), num_local=8,
      ratio=(3 / 4, 4 / 3), hflip=0.5, jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
      grayscale_prob=0.2, blur_radius=(0.1, 2.0), mean=IMAGENET_MEAN, std=IMAGENET_STD))


def check_crops_config(crops, patch_size: int) -> None:
  """One ValueError naming the first bad field of config.crops."""
  expected = set(default_crops_config())
  if set(crops) != expected:
    raise ValueError(f'crops fields {sorted(set(crops) ^ expected)} are unknown or missing; '
                     f'expected exactly {sorted(expected)}')

  def check(name, ok, want):
    if not ok:
      raise ValueError(f'crops.{name}={crops[name]!r}; expected {want}')

  for size in ('global_size', 'local_size'):
    check(size, isinstance(crops[size], int) and crops[size] > 0 and crops[size] % patch_size == 0,
          f'a positive multiple of the patch size {patch_size}')
  for scale in ('global_scale', 'local_scale'):
    check(scale, len(crops[scale]) == 2 and 0 < crops[scale][0] <= crops[scale][1] <= 1,
          '(min, max) with 0 < min <= max <= 1')
  check('num_local', isinstance(crops.num_local, int) and crops.num_local >= 1, 'an integer >= 1')
  for p in ('hflip', 'jitter_prob', 'grayscale_prob'):
    check(p, 0 <= crops[p] <= 1, 'a probability in [0, 1]')
  check('hue', 0 <= crops.hue <= 0.5, 'a hue shift in [0, 0.5]')


# -- the per-view operations ------------------------------------------------------------------------
def adjust_hue(image: Image.Image, factor: float) -> Image.Image:
  """torchvision's PIL adjust_hue: the HSV hue byte shifted by int(factor * 255), wrapping around."""
  h, s, v = image.convert('HSV').split()
  shifted = (np.asarray(h, np.uint8) + np.uint8(int(factor * 255) % 256)).astype(np.uint8)
  return Image.merge('HSV', (Image.fromarray(shifted, 'L'), s, v)).convert('RGB')


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
  """torchvision's ColorJitter: four factors drawn, applied in a random order."""
  factors = [rng.uniform(max(0.0, 1 - brightness), 1 + brightness), rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
             rng.uniform(max(0.0, 1 - saturation), 1 + saturation), rng.uniform(-hue, hue)]
  ops = [lambda im, f: ImageEnhance.Brightness(im).enhance(f), lambda im, f: ImageEnhance.Contrast(im).enhance(f),
         lambda im, f: ImageEnhance.Color(im).enhance(f), adjust_hue]
  for i in rng.permutation(4):
    image = ops[i](image, factors[i])
  return image


def view(image: Image.Image, rng: np.random.Generator, crops, size: int, scale, blur: float,
         solarize: float) -> np.ndarray:
  """One DINO view of an RGB image: float32 (size, size, 3) (module docstring)."""
  image = transforms.random_resized_crop(image, size, scale, crops.ratio, 'bicubic', rng)
  if rng.random() < crops.hflip:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  if rng.random() < crops.jitter_prob:
    image = color_jitter(image, rng, crops.brightness, crops.contrast, crops.saturation, crops.hue)
  if rng.random() < crops.grayscale_prob:
    image = image.convert('L').convert('RGB')
  if rng.random() <= blur:  # DINO's GaussianBlur draws with <=, so probability 1.0 always blurs
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*crops.blur_radius)))
  if rng.random() < solarize:
    image = ImageOps.solarize(image)
  return transforms.normalize(image, crops.mean, crops.std)


class MultiCrop(grain.transforms.RandomMap):
  """Decoded record -> {'global': (2, G, G, 3), 'local': (num_local, L, L, 3)} float32."""

  def __init__(self, crops):
    self.crops = ml_collections.ConfigDict(crops.to_dict())

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    image, c = record['image'], self.crops
    if image is None:  # left out after sharding (_decodable), so every process shards the same stream
      return {'global': None, 'local': None}
    glob = [view(image, rng, c, c.global_size, c.global_scale, **GLOBAL1),
            view(image, rng, c, c.global_size, c.global_scale, **GLOBAL2)]
    local = [view(image, rng, c, c.local_size, c.local_scale, **LOCAL) for _ in range(c.num_local)]
    return {'global': np.stack(glob), 'local': np.stack(local)}


def _decodable(record: dict) -> bool:
  return record['global'] is not None


def multicrop_loader(source, *, global_batch_size: int, crops, seed: int, worker_count: int,
                     shard_index: int | None = None, shard_count: int | None = None) -> grain.IterDataset:
  """Endless batches of this process's shard: one global shuffle per epoch from the seed, every
  process taking every shard_count-th example of it, crops seeded by the example's global position
  (as pipeline.classification_loader's training stream). The iterator's state is checkpointable."""
  shard_index, shard_count = pipeline.process_shard(shard_index, shard_count)
  if global_batch_size < 1 or global_batch_size % shard_count:
    raise ValueError(f'global_batch_size={global_batch_size}; expected a positive multiple of '
                     f'shard_count={shard_count}')
  if worker_count < 0:
    raise ValueError(f'worker_count={worker_count}; expected >= 0 (0 processes in the main process)')
  if not len(source):
    raise ValueError(f'{source!r} is empty')
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds.map(transforms.DecodeImage()).random_map(MultiCrop(crops))
  ds = ds[shard_index::shard_count].to_iter_dataset().filter(_decodable)
  ds = ds.batch(global_batch_size // shard_count, drop_remainder=True)
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
