"""mIoU from a confusion matrix accumulated over a whole validation set and all hosts (spec section 6).

conf[i, j] counts the pixels labelled i and predicted j. Per batch the counts are int32 on device
(one batch never holds 2^31 pixels); across batches and hosts they are summed as int64 on the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from locatvit_jax.data.seg_sources import IGNORE_INDEX


@functools.partial(jax.jit, static_argnames=('num_classes', 'ignore_index'))
def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """int32 (K, K) counts of (label, prediction) over pixels whose label is in 0..K-1 and not ignored."""
  pred = pred.reshape(-1).astype(jnp.int32)
  label = label.reshape(-1).astype(jnp.int32)
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
  cell = jnp.where(valid, label * num_classes + pred, 0)
  counts = jnp.bincount(cell, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def _bucket(n: int) -> int:
  """Next power of two: labels of any size reuse a few compiled confusion_matrix shapes."""
  return 1 << max(n - 1, 0).bit_length()


class ConfusionAccumulator:
  """Sums confusion matrices over `update` calls on this host; `result()` sums over all hosts and
  must be called by every process."""

  def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
    self.num_classes, self.ignore_index = num_classes, ignore_index
    self._total = np.zeros((num_classes, num_classes), np.int64)

  def update(self, pred, label) -> None:
    """pred, label: same-shape integer arrays (any shape), e.g. one image at its label resolution."""
    if np.shape(pred) != np.shape(label):
      raise ValueError(f'prediction {np.shape(pred)} and label {np.shape(label)} shapes differ; '
                       'expected the prediction at the label resolution')
    n = int(np.prod(np.shape(label)))
    size = _bucket(n)
    # Padded on the host: padding on device would compile once per label size.
    pred = np.pad(np.ravel(pred).astype(np.int32), (0, size - n))
    label = np.pad(np.ravel(label).astype(np.int32), (0, size - n), constant_values=self.ignore_index)
    self._total += np.asarray(confusion_matrix(pred, label, self.num_classes, self.ignore_index))

  def result(self) -> np.ndarray:
    """int64 (K, K) confusion matrix over every update on every host."""
    if jax.process_count() == 1:
      return self._total.copy()
    # Without jax_enable_x64 the gather would truncate int64, so the counts travel as two int32
    # halves (exact up to 2^62 per cell).
    high, low = self._total >> 31, self._total & (2**31 - 1)
    gathered = multihost_utils.process_allgather(np.stack([high, low]).astype(np.int32))
    gathered = np.asarray(gathered).astype(np.int64)
    return ((gathered[:, 0] << 31) + gathered[:, 1]).sum(0)


def segmentation_metrics(conf: np.ndarray) -> dict:
  """mIoU (mean over classes present in the labels or the predictions), per-class IoU (nan for
  classes absent from both), pixel accuracy and mean class accuracy (over classes in the labels)."""
  conf = np.asarray(conf, np.float64)
  true_pos = np.diag(conf)
  labelled = conf.sum(1)
  union = labelled + conf.sum(0) - true_pos
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(union > 0, true_pos / union, np.nan)
    class_acc = np.where(labelled > 0, true_pos / labelled, np.nan)
  total = conf.sum()

  def nanmean(x):
    return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float('nan')

  return {'miou': nanmean(iou), 'per_class_iou': iou,
          'pixel_acc': float(true_pos.sum() / total) if total else float('nan'),
          'mean_acc': nanmean(class_acc)}
