"""Segmentation head against a NumPy re-implementation and its initialisation against mmcv's
distributions; bilinear upsampling as PyTorch; the whole-image evaluation geometry against NumPy; the loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf, log_softmax
from scipy.stats import kurtosis

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


def test_init_follows_mmcv():
  """mmcv initialises the authors' head: the C -> hidden conv kaiming-normal (fan_out = hidden, ReLU
  gain: std sqrt(2 / hidden)), GroupNorm weight 1 and bias 0, the classifier normal(0, 0.01) with a
  zero bias. Sizes of ViT-Ti on ADE20K."""
  head = seg_head.SegHead(192, 150, hidden=512, rngs=nnx.Rngs(0))
  for kernel, std in ((head.proj.kernel, np.sqrt(2 / 512)), (head.classifier.kernel, 0.01)):
    w = np.asarray(kernel[...], np.float64).ravel()
    # With n >= 76,800 draws the sample std is within 0.3% of sigma (one standard error) and the
    # excess kurtosis within 0.02 of 0; a uniform law, PyTorch's default, has excess kurtosis -1.2.
    assert abs(w.mean()) < 5 * std / np.sqrt(w.size)
    assert w.std() == pytest.approx(std, rel=0.02)
    assert abs(kurtosis(w)) < 0.1
  np.testing.assert_array_equal(head.norm.scale[...], 1.0)
  np.testing.assert_array_equal(head.norm.bias[...], 0.0)
  np.testing.assert_array_equal(head.classifier.bias[...], 0.0)


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


@pytest.mark.parametrize('geometry', ['reference', 'crop'])
@pytest.mark.parametrize('label_size, valid, padded', EVAL_GEOMETRY)
def test_whole_image_eval_geometry_matches_numpy(label_size, valid, padded, geometry):
  """Resize to the eval scale keeping the ratio, pad to the patch multiple, take the logits to the label
  size with PyTorch's bilinear resizes (align_corners=False), argmax. 'reference', the default (mmseg's
  whole mode): patch grid -> resized image (h, w) -> label. 'crop': patch grid -> padded input, whose
  (h, w) region -> label."""
  rng = np.random.default_rng(3)
  example = {'image': rng.integers(0, 256, (*label_size, 3), dtype=np.uint8),
             'mask': np.zeros(label_size, np.uint8), 'skipped': np.int32(0)}
  ex = seg_transforms.EvalResizeAndPad((64, 32), 16).map(example)
  assert tuple(ex['valid_size']) == valid and ex['image'].shape == (*padded, 3)
  patch_logits = rng.normal(size=(padded[0] // 16, padded[1] // 16, 5)).astype(np.float32)
  chosen = {} if geometry == 'reference' else {'geometry': geometry}  # the reference is the default
  geometry_fn = jax.jit(functools.partial(seg_head.logits_at_label_size, **chosen),
                        static_argnames=('input_size', 'canvas'))
  got = geometry_fn(patch_logits, input_size=padded, valid_size=ex['valid_size'],
                    label_size=np.array(ex['label'].shape, np.int32), canvas=(128, 128))
  h, w = valid
  expected = {'reference': torch_bilinear(torch_bilinear(patch_logits[None], valid), label_size)[0],
              'crop': torch_bilinear(torch_bilinear(patch_logits[None], padded)[:, :h, :w], label_size)[0]}
  assert not np.allclose(expected['reference'], expected['crop'], atol=1e-2)  # every case is padded
  got = got[:label_size[0], :label_size[1]]
  np.testing.assert_allclose(got, expected[geometry], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected[geometry], -1))


def test_unknown_eval_geometry_fails():
  with pytest.raises(ValueError, match=r"geometry='middle'; expected one of \('reference', 'crop'\)"):
    seg_head.logits_at_label_size(jnp.zeros((2, 2, 3)), (32, 32), np.array([30, 30]), np.array([40, 40]),
                                  (64, 64), geometry='middle')


def test_loss_is_mmseg_cross_entropy_over_all_pixels():
  """mmseg's CrossEntropyLoss (avg_non_ignore=False): per-pixel cross-entropy summed over labelled
  pixels, divided by the number of all pixels; 'labelled' divides by the labelled ones."""
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 4, 6)).astype(np.float32) * 3
  mask = rng.integers(0, 6, size=(2, 5, 4))
  mask[rng.random(mask.shape) < 0.3] = 255
  valid = mask != 255
  nll = -np.take_along_axis(log_softmax(logits.astype(np.float64), -1),
                            np.where(valid, mask, 0)[..., None], -1)[..., 0]
  expected = {'all': nll[valid].sum() / mask.size, 'labelled': nll[valid].mean()}
  changed = np.where(valid[..., None], logits, 1e4)
  for average, value in expected.items():
    chosen = {} if average == 'all' else {'average': average}  # 'all' is the default
    loss = seg_head.segmentation_loss(jnp.asarray(logits), jnp.asarray(mask), **chosen)
    assert float(loss) == pytest.approx(value, rel=1e-5), average
    # Ignored pixels add nothing, whatever their logits.
    assert float(seg_head.segmentation_loss(jnp.asarray(changed), jnp.asarray(mask), **chosen)) == pytest.approx(
        float(loss), rel=1e-6)


@pytest.mark.parametrize('average', ['all', 'labelled'])
def test_loss_with_every_pixel_ignored_is_zero_with_finite_gradients(average):
  logits = jnp.ones((1, 3, 3, 4))
  mask = jnp.full((1, 3, 3), 255)
  loss, grad = jax.value_and_grad(seg_head.segmentation_loss)(logits, mask, average=average)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
  with pytest.raises(ValueError, match=r'logits \(1, 3, 3, 4\) and mask \(1, 3, 2\) disagree'):
    seg_head.segmentation_loss(logits, mask[..., :2])
  with pytest.raises(ValueError, match=r"average='mean'; expected one of \('all', 'labelled'\)"):
    seg_head.segmentation_loss(logits, mask, average='mean')
