"""Segmentation input pipelines: an endless, resumable training loader and whole-image evaluation.

Training: a Grain DataLoader over this process's shard of the source, reshuffled every epoch, each
example augmented with a random stream keyed by (seed, position in the sample order), so the batches
do not depend on the number of workers and a restored iterator continues exactly where it stopped
(its state goes into our checkpoints through Grain's Orbax handler).

Evaluation (mmseg's 'whole' mode): each image is resized to fit the eval scale keeping its ratio and
run through the model at that size; it is padded bottom/right only to the next multiple of the patch
size (with zeros after normalising, as the authors' timm backbone pads inside the model), so the number
of distinct input shapes (and jit compilations) stays bounded by the scale. The caller resizes the
logits to the original label's size (seg_head.logits_at_label_size, using `valid_size`) and scores the
argmax against that label: the metric is always at the original resolution.

A corrupt image or label file does not stop either: it becomes a stand-in marked 'skipped' (see
seg_transforms.DecodeExample), which the trainer and the evaluation count.
"""

from __future__ import annotations

import numbers

import grain

from locatvit_jax.data import pipeline, seg_transforms
from locatvit_jax.data.seg_sources import LabelMap


def _check_sizes(**sizes) -> None:
  """Positive integer sizes and scale pairs; ratio ranges 0 < low <= high."""
  for name, value in sizes.items():
    if name == 'ratio_range':
      ok = len(value) == 2 and 0 < value[0] <= value[1]
      expected = 'two ratios 0 < low <= high'
    elif name == 'scale':
      ok = len(value) == 2 and all(isinstance(v, numbers.Integral) and v > 0 for v in value)
      expected = 'two positive integers (long, short), e.g. (2048, 512)'
    else:
      ok = isinstance(value, numbers.Integral) and value > 0
      expected = 'a positive integer'
    if not ok:
      raise ValueError(f'{name}={value!r}; expected {expected}')


def segmentation_train_loader(source, *, global_batch_size: int, crop_size: int, scale, ratio_range,
                              label_map: LabelMap, seed: int, worker_count: int,
                              shard_index: int | None = None,
                              shard_count: int | None = None) -> grain.DataLoader:
  """Endless batches of this process's share of the global batch:
  {'image': float32 (b, crop, crop, 3) normalised, 'mask': int32 (b, crop, crop) classes or 255,
   'skipped': int32 (b,) 1 for the stand-ins of corrupt files (seg_transforms.DecodeExample), all ignored}."""
  _check_sizes(global_batch_size=global_batch_size, crop_size=crop_size, scale=tuple(scale),
               ratio_range=tuple(ratio_range))
  shard_index, shard_count = pipeline.process_shard(shard_index, shard_count)
  if global_batch_size % shard_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by {shard_count} shards')
  if len(source) < shard_count:
    raise ValueError(f'{source.name} has {len(source)} examples; expected at least one per shard '
                     f'({shard_count})')
  shard_options = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard_options, shuffle=True,
                                        num_epochs=None, seed=seed)
  operations = seg_transforms.train_transforms(label_map, crop_size=crop_size, scale=scale,
                                               ratio_range=ratio_range)
  operations.append(grain.transforms.Batch(global_batch_size // shard_count, drop_remainder=True))
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=worker_count, shard_options=shard_options)


def segmentation_eval_examples(source, *, scale, label_map: LabelMap, patch_size: int,
                               shard_index: int | None = None, shard_count: int | None = None,
                               num_threads: int = 8) -> grain.IterDataset:
  """This process's share of the images, one at a time, in order, decoded by `num_threads` threads:
  {'image': float32 (H', W', 3) normalised and padded to multiples of patch_size,
   'valid_size': int32 (2,) the resized image's (h, w) inside it,
   'label': int32 (H0, W0) classes or 255 at the original resolution,
   'original_image': uint8 (H0, W0, 3),
   'skipped': int32 1 for the stand-in of a corrupt file (seg_transforms.DecodeExample), to leave out}."""
  _check_sizes(scale=tuple(scale), patch_size=patch_size)
  shard_index, shard_count = pipeline.process_shard(shard_index, shard_count)
  dataset = (grain.MapDataset.source(source)[shard_index::shard_count]
             .map(seg_transforms.DecodeExample(label_map))
             .map(seg_transforms.EvalResizeAndPad(scale, patch_size)))
  # A short prefetch buffer: one decoded example can hold tens of MB.
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=2 * num_threads))
