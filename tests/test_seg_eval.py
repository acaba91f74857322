"""Segmentation metrics against scikit-learn; accumulation over images and (simulated) hosts."""

import warnings

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from locatvit_jax.evaluators import segmentation as seg_eval

K = 7


def random_images(seed=0):
  """Predictions and labels of several sizes, with ignored pixels, class 6 never labelled or
  predicted, class 5 predicted but never labelled, class 4 labelled but never predicted."""
  rng = np.random.default_rng(seed)
  images = []
  for shape in [(13, 17), (32, 24), (5, 40), (21, 21)]:
    label = rng.choice([0, 1, 2, 3, 4, 255], size=shape, p=[.3, .2, .15, .1, .1, .15])
    pred = np.where(rng.random(shape) < 0.6, label, rng.choice([0, 1, 2, 3, 5], size=shape))
    pred = np.where((pred == 255) | (pred == 4), 2, pred)
    images.append((pred.astype(np.int32), label.astype(np.int32)))
  return images


def sklearn_reference(images):
  pred = np.concatenate([p.ravel() for p, _ in images])
  label = np.concatenate([l.ravel() for _, l in images])
  valid = label != 255
  pred, label = pred[valid], label[valid]
  iou = skm.jaccard_score(label, pred, labels=range(K), average=None, zero_division=0)
  iou[~np.isin(range(K), np.union1d(label, pred))] = np.nan  # absent from both: left out
  return {'conf': skm.confusion_matrix(label, pred, labels=range(K)),
          'per_class_iou': iou,
          'miou': np.nanmean(iou),
          'pixel_acc': skm.accuracy_score(label, pred),
          'mean_acc': balanced_accuracy(label, pred)}


def balanced_accuracy(label, pred):
  """Mean recall over the labelled classes; predicting unlabelled classes is expected here."""
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', 'y_pred contains classes not in y_true')
    return skm.balanced_accuracy_score(label, pred)


def test_confusion_matrix_and_metrics_match_sklearn():
  images = random_images()
  acc = seg_eval.ConfusionAccumulator(K)
  for pred, label in images:
    acc.update(pred, label)
  conf = acc.result()
  ref = sklearn_reference(images)
  assert conf.dtype == np.int64
  np.testing.assert_array_equal(conf, ref['conf'])
  result = seg_eval.segmentation_metrics(conf)
  np.testing.assert_allclose(result['per_class_iou'], ref['per_class_iou'], equal_nan=True)
  assert np.isnan(result['per_class_iou'][6]) and result['per_class_iou'][5] == 0.0
  assert result['per_class_iou'][4] == 0.0
  for key in ('miou', 'pixel_acc', 'mean_acc'):
    assert result[key] == pytest.approx(ref[key], rel=1e-12), key


def test_confusion_matrix_is_jittable_on_batches():
  pred, label = random_images()[1]
  batch_pred, batch_label = np.stack([pred, pred[::-1]]), np.stack([label, label[::-1]])
  conf = jax.jit(seg_eval.confusion_matrix, static_argnums=2)(batch_pred, batch_label, K)
  assert conf.dtype == np.int32
  np.testing.assert_array_equal(conf, 2 * sklearn_reference([(pred, label)])['conf'])


def test_labels_outside_the_classes_never_count():
  conf = seg_eval.confusion_matrix(np.array([1, 1, 1, 2]), np.array([1, 255, K, -1]), K)
  assert int(conf.sum()) == 1 and int(conf[1, 1]) == 1


def test_no_labelled_pixels_give_nan_not_errors():
  result = seg_eval.segmentation_metrics(np.zeros((K, K), np.int64))
  assert np.isnan(result['miou']) and np.isnan(result['pixel_acc']) and np.isnan(result['mean_acc'])


def test_update_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r'prediction \(4, 5\) and label \(4, 6\) shapes differ'):
    seg_eval.ConfusionAccumulator(K).update(np.zeros((4, 5)), np.zeros((4, 6)))


def test_hosts_are_summed_exactly_beyond_int32(monkeypatch):
  """Two simulated processes whose counts exceed int32: the gather must stay exact."""
  acc = seg_eval.ConfusionAccumulator(3)
  acc._total[:] = [[3 * 2**31 + 5, 1, 0], [0, 2**40 + 7, 2], [0, 0, 2**31 - 1]]
  other = acc._total * 2
  monkeypatch.setattr(seg_eval.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(seg_eval.multihost_utils, 'process_allgather',
                      lambda x: np.stack([x, np.stack([other >> 31, other & (2**31 - 1)]).astype(np.int32)]))
  np.testing.assert_array_equal(acc.result(), acc._total * 3)
