"""Classification input pipeline: a source -> shuffled, sharded, augmented, batched Grain dataset.

Train: one global shuffle per epoch (from the seed), every process takes every shard_count-th
example of that order, augmentation seeded by the example's global position, drop_remainder.
Eval: one pass in file order; every process gets the same number of full batches, the last ones
padded with 'valid' = 0, so the processes stay in step and every example counts exactly once.

Decoding and augmentation run in `worker_count` Grain worker processes, which also build the
batches (passed back through shared memory). The iterator of the returned dataset has
get_state/set_state, so `grain.checkpoint.CheckpointSave/Restore` stores its position. Training
batches are built from each worker's share of the example stream, so their composition depends
on worker_count: resume with the same worker_count.

Corrupt images: logged with their key by the worker that hits them, dropped (train) or masked
(eval), and counted in the int32 'skipped' field of each batch; `batch['skipped'].sum()` is the
number of corrupt records since the previous batch, exact across workers.
"""

from __future__ import annotations

import math

import grain
import jax
import ml_collections
import numpy as np

from locatvit_jax.data import transforms
from locatvit_jax.models import vit

# A training stream this long without one decodable image is not an image dataset.
MAX_CONSECUTIVE_SKIPS = 1000


def default_aug_config() -> ml_collections.ConfigDict:
  """The paper's augmentation (timm's DeiT-style recipe, spec section 5).

  rrc_scale, rrc_ratio: random resized crop area fraction and aspect ratio ranges.
  interpolation: resampling for the crop and RandAugment's geometric ops: 'bilinear', 'bicubic' or
    'random' (timm's training default: either, drawn per resize).
  hflip: horizontal flip probability.
  randaug_num_ops, randaug_magnitude, randaug_magnitude_std, randaug_increasing: timm's
    'rand-m9-mstd0.5-inc1' (2 ops per image; 0 ops turns RandAugment off).
  erase_prob: random erasing probability (a box of per-pixel N(0, 1) noise). Applied by the train
    step to the mixed, normalised batch (train/mixup.py), not by this pipeline.
  mean, std: per-channel normalisation of [0, 1] RGB (the ViT family's; classification_config sets its
    model family's).
  eval_resize: evaluation resizes the short side to this (bicubic) and centre-crops img_size.
  """
  return ml_collections.ConfigDict(dict(
      rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3), interpolation='random', hflip=0.5,
      randaug_num_ops=2, randaug_magnitude=9.0, randaug_magnitude_std=0.5, randaug_increasing=True,
      erase_prob=0.25, mean=vit.NORMALIZATION[0], std=vit.NORMALIZATION[1], eval_resize=248))


def check_aug_config(aug) -> None:
  """Raises ValueError naming the first bad or unknown field of `aug`."""
  expected = set(default_aug_config())
  if set(aug) != expected:
    raise ValueError(f'aug fields {sorted(set(aug) ^ expected)} are unknown or missing; '
                     f'expected exactly {sorted(expected)}')

  def check(name, ok, want):
    if not ok:
      raise ValueError(f'aug.{name}={aug[name]!r}; expected {want}')

  lo, hi = aug.rrc_scale
  check('rrc_scale', 0 < lo <= hi <= 1, '(min, max) with 0 < min <= max <= 1')
  lo, hi = aug.rrc_ratio
  check('rrc_ratio', 0 < lo <= hi, '(min, max) with 0 < min <= max')
  check('interpolation', aug.interpolation in transforms.INTERPOLATION_NAMES,
        f'one of {transforms.INTERPOLATION_NAMES}')
  check('hflip', 0 <= aug.hflip <= 1, 'a probability in [0, 1]')
  check('randaug_num_ops', int(aug.randaug_num_ops) == aug.randaug_num_ops >= 0, 'an integer >= 0')
  check('randaug_magnitude', 0 <= aug.randaug_magnitude <= 10, 'a magnitude in [0, 10]')
  check('randaug_magnitude_std', aug.randaug_magnitude_std >= 0, 'a standard deviation >= 0')
  check('erase_prob', 0 <= aug.erase_prob <= 1, 'a probability in [0, 1]')
  check('mean', len(aug.mean) == 3, '3 per-channel values')
  check('std', len(aug.std) == 3 and min(aug.std) > 0, '3 positive per-channel values')


def process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(shard_index, shard_count), checked; by default this JAX process's shard (one per process).
  The classification and segmentation loaders take theirs from here."""
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= index < count:
    raise ValueError(f'shard_index={index}; expected 0 <= shard_index < shard_count={count}')
  return index, count


def classification_loader(source, *, train: bool, global_batch_size: int, img_size: int, aug, seed: int,
                          worker_count: int, shard_index: int | None = None, shard_count: int | None = None,
                          num_epochs: int | None = None, eval_resize: int | None = None) -> grain.IterDataset:
  """Batches {'image': float32 (b, img_size, img_size, 3), 'label': int32 (b,), 'skipped': int32 (b,)}
  (+ 'valid': int32 (b,) for eval), b = global_batch_size / shard_count, for this process's shard.

  source: random access records {'image', 'label', 'key'} (see sources.py).
  aug: fields of default_aug_config(); eval uses mean, std and eval_resize (overridden by the
    `eval_resize` argument).
  shard_index, shard_count: default jax.process_index() / jax.process_count().
  num_epochs: train only; None repeats forever.
  """
  check_aug_config(aug)
  shard_index, shard_count = process_shard(shard_index, shard_count)
  if global_batch_size < 1 or global_batch_size % shard_count:
    raise ValueError(f'global_batch_size={global_batch_size}; expected a positive multiple of '
                     f'shard_count={shard_count}')
  if img_size < 1:
    raise ValueError(f'img_size={img_size}; expected a positive number of pixels')
  if worker_count < 0:
    raise ValueError(f'worker_count={worker_count}; expected >= 0 (0 processes in the main process)')
  if not len(source):
    raise ValueError(f'{source!r} is empty')
  local_batch = global_batch_size // shard_count

  if train:
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f'num_epochs={num_epochs}; expected a positive number or None (forever)')
    ds = _train_dataset(source, img_size, aug, seed, shard_index, shard_count, num_epochs, local_batch)
  else:
    if num_epochs is not None:
      raise ValueError(f'num_epochs={num_epochs} given for evaluation, which is always one pass')
    resize = eval_resize or aug.eval_resize
    if resize < img_size:
      raise ValueError(f'eval_resize={resize} is smaller than img_size={img_size}; the centre crop must fit')
    ds = _eval_dataset(source, img_size, resize, aug, shard_index, shard_count, local_batch)
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def _train_dataset(source, img_size, aug, seed, shard_index, shard_count, num_epochs, local_batch):
  # Shuffle and augment before sharding: the order is global, and an example's augmentation is
  # seeded by its global position, so it does not depend on the number of processes.
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
  ds = ds.map(transforms.DecodeImage()).random_map(transforms.TrainAugment(img_size, aug))
  ds = ds[shard_index::shard_count].to_iter_dataset()
  return DropUndecodable(ds).batch(local_batch, drop_remainder=True)


def _eval_dataset(source, img_size, resize, aug, shard_index, shard_count, local_batch):
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  ds = ds.map(transforms.DecodeImage()).map(transforms.EvalPreprocess(img_size, resize, aug.mean, aug.std))
  # Same number of full batches on every process: pad to the longest shard, rounded up to a batch.
  padded = math.ceil(math.ceil(len(source) / shard_count) / local_batch) * local_batch
  if padded > len(ds):
    ds = grain.MapDataset.concatenate([ds, grain.MapDataset.range(padded - len(ds)).map(Padding(img_size))])
  # Batch before the workers split the stream: each worker then builds whole batches, never the
  # partial ones that batching each worker's share of examples would leave.
  return ds.batch(local_batch).to_iter_dataset()


class Padding(grain.transforms.Map):
  """Index -> an all-zero example with valid 0, to fill the last evaluation batches."""

  def __init__(self, img_size: int):
    self.img_size = img_size

  def map(self, _):
    return {'image': np.zeros((self.img_size, self.img_size, 3), np.float32), 'label': np.int32(0),
            'valid': np.int32(0), 'skipped': np.int32(0)}


class DropUndecodable(grain.IterDataset):
  """Drops training examples whose image could not be decoded (image None) and keeps count.

  Each kept example's 'skipped' is the number dropped right before it, so the sum over a batch is
  exact wherever the batch was built. Stateless beyond its parent, so checkpoints stay exact.
  """

  def __iter__(self):
    return _DropUndecodableIterator(self._parent.__iter__())


class _DropUndecodableIterator(grain.DatasetIterator):

  def __next__(self) -> dict:
    skipped = 0
    while True:
      record = next(self._parent)
      if record['image'] is not None:
        return {'image': record['image'], 'label': np.int32(record['label']), 'skipped': np.int32(skipped)}
      skipped += 1
      if skipped >= MAX_CONSECUTIVE_SKIPS:
        raise ValueError(f'{skipped} undecodable images in a row (last: {record["key"]}); '
                         'expected a dataset of images')

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)
