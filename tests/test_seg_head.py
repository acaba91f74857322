"""Segmentation head against a NumPy re-implementation; bilinear upsampling as PyTorch; the whole-image
evaluation geometry against NumPy; the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf, log_softmax

from locatvit_jax.data import seg_transforms
from locatvit_jax.models import seg_head


def numpy_head(head, features):
  """conv1x1 -> GroupNorm(1 group, eps 1e-5) -> exact GELU -> conv1x1 + bias, per image."""
  x = features.astype(np.float64) @ np.asarray(head.proj.kernel[...], np.float64)
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  var = x.var(axis=(1, 2, 3), keepdims=True)
  x = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(head.norm.scale[...]) + np.asarray(head.norm.bias[...])
  x = 0.5 * x * (1 + erf(x / np.sqrt(2)))
  return x @ np.asarray(head.classifier.kernel[...]) + np.asarray(head.classifier.bias[...])


def test_head_matches_numpy_reference():
  head = seg_head.SegHead(24, 5, hidden=16, rngs=nnx.Rngs(0))
  # Non-trivial norm affine and classifier bias, so each term is checked.
  rng = np.random.default_rng(0)
  head.norm.scale[...] = jnp.asarray(rng.normal(1, 0.3, 16), jnp.float32)
  head.norm.bias[...] = jnp.asarray(rng.normal(0, 0.3, 16), jnp.float32)
  head.classifier.bias[...] = jnp.asarray(rng.normal(0, 0.3, 5), jnp.float32)
  features = rng.normal(size=(3, 4, 6, 24)).astype(np.float32)
  features[1] *= 50.0  # GroupNorm per image: one image's scale must not leak into another
  logits = head(jnp.asarray(features, jnp.bfloat16))
  assert logits.shape == (3, 4, 6, 5) and logits.dtype == jnp.float32
  expected = numpy_head(head, np.asarray(jnp.asarray(features, jnp.bfloat16).astype(jnp.float32)))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
  assert head.proj.bias is None and head.norm.num_groups == 1
  assert sum(p.size for p in jax.tree.leaves(nnx.state(head, nnx.Param))) == 24 * 16 + 2 * 16 + 16 * 5 + 5


def test_head_rejects_token_sequences():
  head = seg_head.SegHead(8, 3, hidden=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'features have shape \(2, 16, 8\); expected \(batch, h, w'):
    head(jnp.zeros((2, 16, 8)))


def torch_bilinear(x, size):
  """F.interpolate(mode='bilinear', align_corners=False) on (B, H, W, K), written out in NumPy."""
  def axis_weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m
  rows, cols = axis_weights(x.shape[1], size[0]), axis_weights(x.shape[2], size[1])
  return np.einsum('ih,bhwk,jw->bijk', rows, x, cols)


@pytest.mark.parametrize('size', [(32, 48), (5, 7), (13, 4)])
def test_upsample_logits_matches_pytorch_bilinear(size):
  logits = np.random.default_rng(1).normal(size=(2, 8, 6, 3)).astype(np.float32)
  out = seg_head.upsample_logits(jnp.asarray(logits), size)
  assert out.shape == (2, *size, 3)
  np.testing.assert_allclose(out, torch_bilinear(logits, size), rtol=1e-5, atol=1e-5)


# Odd label sizes -> the eval scale (64, 32) fit by hand (mmcv's keep-ratio rescale), and the input padded
# to multiples of 16. The last label is smaller than its fit: the logits are shrunk, not enlarged.
EVAL_GEOMETRY = [((37, 53), (32, 46), (32, 48)),  # factor 32/37: 53 * 32/37 = 45.8 -> 46
                 ((91, 29), (64, 20), (64, 32)),  # factor 64/91: 29 * 64/91 = 20.4 -> 20
                 ((21, 27), (32, 41), (32, 48))]  # factor 32/21: 27 * 32/21 = 41.1 -> 41


@pytest.mark.parametrize('label_size, valid, padded', EVAL_GEOMETRY)
def test_whole_image_eval_geometry_matches_numpy(label_size, valid, padded):
  """Resize to the eval scale keeping the ratio, pad to the patch multiple, upsample the patch logits,
  resize the valid region to the label size as PyTorch's bilinear (align_corners=False), argmax."""
  rng = np.random.default_rng(3)
  example = {'image': rng.integers(0, 256, (*label_size, 3), dtype=np.uint8),
             'mask': np.zeros(label_size, np.uint8), 'skipped': np.int32(0)}
  ex = seg_transforms.EvalResizeAndPad((64, 32), 16).map(example)
  assert tuple(ex['valid_size']) == valid and ex['image'].shape == (*padded, 3)
  patch_logits = rng.normal(size=(padded[0] // 16, padded[1] // 16, 5)).astype(np.float32)
  geometry = jax.jit(seg_head.logits_at_label_size, static_argnames=('input_size', 'canvas'))
  got = geometry(patch_logits, input_size=padded, valid_size=ex['valid_size'],
                 label_size=np.array(ex['label'].shape, np.int32), canvas=(128, 128))
  h, w = valid
  expected = torch_bilinear(torch_bilinear(patch_logits[None], padded)[:, :h, :w], label_size)[0]
  np.testing.assert_allclose(got[:label_size[0], :label_size[1]], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(got[:label_size[0], :label_size[1]], -1), np.argmax(expected, -1))


def test_loss_ignores_255_like_numpy_cross_entropy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 4, 6)).astype(np.float32) * 3
  mask = rng.integers(0, 6, size=(2, 5, 4))
  mask[rng.random(mask.shape) < 0.3] = 255
  valid = mask != 255
  nll = -np.take_along_axis(log_softmax(logits.astype(np.float64), -1),
                            np.where(valid, mask, 0)[..., None], -1)[..., 0]
  loss = seg_head.segmentation_loss(jnp.asarray(logits), jnp.asarray(mask))
  assert float(loss) == pytest.approx(nll[valid].mean(), rel=1e-5)
  # Ignored pixels have no influence at all, whatever their logits.
  changed = np.where(valid[..., None], logits, 1e4)
  assert float(seg_head.segmentation_loss(jnp.asarray(changed), jnp.asarray(mask))) == pytest.approx(
      float(loss), rel=1e-6)


def test_loss_with_every_pixel_ignored_is_zero_with_finite_gradients():
  logits = jnp.ones((1, 3, 3, 4))
  mask = jnp.full((1, 3, 3), 255)
  loss, grad = jax.value_and_grad(seg_head.segmentation_loss)(logits, mask)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
  with pytest.raises(ValueError, match=r'logits \(1, 3, 3, 4\) and mask \(1, 3, 2\) disagree'):
    seg_head.segmentation_loss(logits, mask[..., :2])
