"""Mixup / CutMix: timm's batch-mode semantics, checked against NumPy on the actual outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locatvit_jax.train import mixup

B, H, W, K = 6, 12, 10, 8
# As in the train step: jitted, hyperparameters static (eager dispatch would dominate test time).
mix = jax.jit(mixup.mixup_cutmix, static_argnames=(
    'num_classes', 'mixup_alpha', 'cutmix_alpha', 'switch_prob', 'label_smoothing'))


def constant_images():
  """Image i is filled with the value i + 1, so every output pixel tells where it came from."""
  return jnp.broadcast_to(jnp.arange(1, B + 1, dtype=jnp.float32)[:, None, None, None], (B, H, W, 3))


LABELS = jnp.arange(B)  # distinct, and y[i] != y[B - 1 - i] for even B


def own_lambda(targets):
  """lam as the targets state it (smoothing 0): the weight on each example's own label."""
  return np.asarray(targets)[np.arange(B), np.asarray(LABELS)]


def test_alphas_zero_is_identity_with_smoothed_targets():
  images = jax.random.normal(jax.random.key(0), (B, H, W, 3))
  out, targets = mix(jax.random.key(1), images, LABELS, num_classes=K, mixup_alpha=0.0,
                                    cutmix_alpha=0.0, label_smoothing=0.1)
  np.testing.assert_array_equal(out, images)
  expected = np.full((B, K), 0.1 / K, np.float32)
  expected[np.arange(B), np.asarray(LABELS)] = 1 - 0.1 + 0.1 / K
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  assert targets.dtype == jnp.float32


def test_mixup_blends_with_the_flipped_batch():
  images = jax.random.normal(jax.random.key(0), (B, H, W, 3))
  for seed in range(5):
    out, targets = mix(jax.random.key(seed), images, LABELS, num_classes=K, mixup_alpha=0.8,
                                      cutmix_alpha=0.0, label_smoothing=0.0)
    lam = own_lambda(targets)
    assert np.allclose(lam, lam[0]) and 0 <= lam[0] <= 1  # one lambda per batch
    x = np.asarray(images)
    np.testing.assert_allclose(out, lam[0] * x + (1 - lam[0]) * x[::-1], rtol=1e-5, atol=1e-6)
    flipped = np.asarray(targets)[np.arange(B), np.asarray(LABELS)[::-1]]
    np.testing.assert_allclose(flipped, 1 - lam, rtol=1e-6)


def timm_pasted_fractions(n, alpha, rng):
  """timm's rand_bbox drawn n times in NumPy: the fraction of pixels each box covers."""
  lam = rng.beta(alpha, alpha, n)
  cut_h, cut_w = (H * np.sqrt(1 - lam)).astype(int), (W * np.sqrt(1 - lam)).astype(int)
  cy, cx = rng.integers(0, H, n), rng.integers(0, W, n)
  h = np.clip(cy + cut_h // 2, 0, H) - np.clip(cy - cut_h // 2, 0, H)
  w = np.clip(cx + cut_w // 2, 0, W) - np.clip(cx - cut_w // 2, 0, W)
  return h * w / (H * W)


def test_cutmix_pastes_a_box_and_lambda_is_its_area():
  n = 2000
  keys = jax.random.split(jax.random.key(0), n)
  cutmix = jax.jit(jax.vmap(lambda k: mixup.mixup_cutmix(k, constant_images(), LABELS, num_classes=K, mixup_alpha=0.0,
                                                         cutmix_alpha=1.0, label_smoothing=0.0)))
  out, targets = jax.device_get(cutmix(keys))
  out = out[..., 0]
  own = out == np.arange(1, B + 1)[:, None, None]
  pasted = out == np.arange(B, 0, -1)[:, None, None]
  assert np.all(own | pasted)  # every pixel is its own or its partner's, unblended
  boxes = pasted[:, 0]
  assert np.all(pasted == boxes[:, None])  # the same box in every image of a batch
  for box in boxes[:200]:  # a rectangle
    if box.any():
      rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
      assert box.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
  fraction = boxes.mean((1, 2))
  lam = targets[:, np.arange(B), np.asarray(LABELS)]  # the weight on each example's own label
  np.testing.assert_allclose(lam, np.tile(1 - fraction[:, None], B), rtol=1e-6)
  # The pasted areas follow timm's recipe: same mean, and same distribution (Kolmogorov-Smirnov
  # distance; 0.044 is chance at p = 0.001 for these sample sizes).
  reference = timm_pasted_fractions(100_000, 1.0, np.random.default_rng(0))
  assert abs(fraction.mean() - reference.mean()) < 0.015, (fraction.mean(), reference.mean())
  grid = np.linspace(0, 1, 121)
  ecdf = lambda x: np.searchsorted(np.sort(x), grid, side='right') / len(x)
  assert np.abs(ecdf(fraction) - ecdf(reference)).max() < 0.05


def test_box_mask_matches_timm_rand_bbox():
  # timm: cut = int(side * sqrt(1 - lam)), box = clip(centre -+ cut // 2); lam -> 1 - box area.
  for seed, lam in [(0, 0.3), (1, 0.7), (2, 0.05), (3, 0.99)]:
    mask, area = mixup.cutmix_box_mask(jax.random.key(seed), H, W, jnp.float32(lam))
    mask = np.asarray(mask)
    cut_h, cut_w = int(H * np.sqrt(1 - lam)), int(W * np.sqrt(1 - lam))
    assert mask.sum(0).max() <= 2 * (cut_h // 2) and mask.sum(1).max() <= 2 * (cut_w // 2)
    np.testing.assert_allclose(float(area), mask.mean(), rtol=1e-6)
    assert set(np.unique(mask)) <= {0.0, 1.0}


def test_switch_probability_picks_one_method_per_batch_and_targets_are_distributions():
  images = constant_images()
  is_cutmix = []
  for seed in range(60):
    out, targets = mix(jax.random.key(seed), images, LABELS, num_classes=K, label_smoothing=0.0)
    # CutMix keeps pixel values; Mixup (almost surely) blends them.
    is_cutmix.append(np.all(np.isin(np.asarray(out), np.arange(1, B + 1))))
    targets = np.asarray(targets)
    assert targets.shape == (B, K) and targets.dtype == np.float32 and targets.min() >= 0
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  assert 0.3 < np.mean(is_cutmix) < 0.7
  for seed in range(3):
    out = mix(jax.random.key(seed), images, LABELS, num_classes=K, label_smoothing=0.0, switch_prob=1.0)[0]
    assert np.all(np.isin(np.asarray(out), np.arange(1, B + 1)))


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_classes=0), 'num_classes=0'),
    (dict(mixup_alpha=-1.0), 'mixup_alpha=-1.0'),
    (dict(switch_prob=1.5), 'switch_prob=1.5'),
    (dict(label_smoothing=1.0), 'label_smoothing=1.0'),
])
def test_bad_arguments(kwargs, message):
  kwargs = {'num_classes': K, **kwargs}
  with pytest.raises(ValueError, match=message):
    mixup.mixup_cutmix(jax.random.key(0), constant_images(), LABELS, **kwargs)
  with pytest.raises(ValueError, match=r'expected \(B, H, W, C\)'):
    mixup.mixup_cutmix(jax.random.key(0), constant_images()[0], LABELS, num_classes=K)
