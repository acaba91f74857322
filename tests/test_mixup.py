"""Mixup / CutMix (timm's batch mode, per group) and random erasing after them, checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from locatvit_jax.train import mixup

B, H, W, K = 6, 12, 10, 8
# As in the train step: jitted, hyperparameters static (eager dispatch would dominate test time).
mix = jax.jit(mixup.mixup_cutmix, static_argnames=(
    'num_classes', 'mixup_alpha', 'cutmix_alpha', 'switch_prob', 'label_smoothing', 'group_size'))


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
    (dict(group_size=4), 'group_size=4 for a batch of 6'),
    (dict(group_size=0), 'group_size=0 for a batch of 6'),
])
def test_bad_arguments(kwargs, message):
  kwargs = {'num_classes': K, **kwargs}
  with pytest.raises(ValueError, match=message):
    mixup.mixup_cutmix(jax.random.key(0), constant_images(), LABELS, **kwargs)
  with pytest.raises(ValueError, match=r'expected \(B, H, W, C\)'):
    mixup.mixup_cutmix(jax.random.key(0), constant_images()[0], LABELS, num_classes=K)


# -- groups ------------------------------------------------------------------------------------------
G_IMAGES = jnp.broadcast_to(jnp.arange(1, 9, dtype=jnp.float32)[:, None, None, None], (8, H, W, 3))
G_LABELS = jnp.arange(8)


def test_groups_draw_independently_and_mix_within_themselves():
  # Two groups of 4: image i's partner is the mirror image within its own group, as in timm, where
  # each GPU's batch is flipped on its own.
  partner = np.array([3, 2, 1, 0, 7, 6, 5, 4])
  lams, methods = [], []
  for seed in range(20):
    out, targets = mix(jax.random.key(seed), G_IMAGES, G_LABELS, num_classes=8, label_smoothing=0.0, group_size=4)
    out, targets = np.asarray(out), np.asarray(targets)
    lam = targets[np.arange(8), np.arange(8)]
    np.testing.assert_allclose(targets[np.arange(8), partner], 1 - lam, rtol=1e-6)
    assert np.allclose(lam[:4], lam[0]) and np.allclose(lam[4:], lam[4])  # one draw per group
    # Every pixel comes from the image itself or its partner (blended or pasted), never another group.
    for i in range(8):
      own, other = i + 1.0, partner[i] + 1.0
      weight = (out[i] - other) / (own - other)  # 1: own pixel, 0: the partner's
      assert weight.min() >= -1e-5 and weight.max() <= 1 + 1e-5
      np.testing.assert_allclose(weight.mean(), lam[i], rtol=1e-5, atol=1e-6)
    lams.append((lam[0], lam[4]))
    methods.append([np.all(np.isin(out[g], np.arange(1, 9))) for g in (slice(0, 4), slice(4, 8))])
  assert all(a != b for a, b in lams)
  assert any(a != b for a, b in methods)  # CutMix in one group, Mixup in the other


def test_a_group_of_the_batch_or_more_is_the_per_batch_draw():
  images = jax.random.normal(jax.random.key(0), (8, H, W, 3))
  for seed in range(3):
    key = jax.random.key(seed)
    whole = mix(key, images, G_LABELS, num_classes=8)
    for group_size in (8, 64):
      jax.tree.map(np.testing.assert_array_equal, mix(key, images, G_LABELS, num_classes=8, group_size=group_size),
                   whole)
  # Per batch: one lambda, and every image mixed with the whole batch's mirror image.
  out, targets = mix(jax.random.key(0), G_IMAGES, G_LABELS, num_classes=8, label_smoothing=0.0,
                     cutmix_alpha=0.0, group_size=8)
  lam = np.asarray(targets)[np.arange(8), np.arange(8)]
  assert np.allclose(lam, lam[0])
  np.testing.assert_allclose(np.asarray(out)[:, 0, 0, 0], lam[0] * np.arange(1, 9) + (1 - lam[0]) * np.arange(8, 0, -1),
                             rtol=1e-5)


# -- random erasing -----------------------------------------------------------------------------------
def timm_erased_boxes(n, height, width, rng):
  """(h, w) of n boxes as timm's RandomErasing draws them (one box, 10 attempts); (0, 0) if none fit."""
  hw = np.zeros((n, 2), int)
  for i in range(n):
    for _ in range(10):
      area = rng.uniform(0.02, 1 / 3) * height * width
      aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
      h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
      if h < height and w < width:
        hw[i] = h, w
        break
  return hw


def box_sizes(erased):
  """(n, H, W) bool -> (n, 2) height and width of each image's erased rectangle; checks it is one."""
  h, w = erased.any(2).sum(1), erased.any(1).sum(1)
  np.testing.assert_array_equal(erased.sum((1, 2)), h * w)
  for img in erased[:100]:
    rows, cols = np.nonzero(img.any(1))[0], np.nonzero(img.any(0))[0]
    assert len(rows) == 0 or (rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols))
  return np.stack([h, w], 1)


def test_random_erasing_draws_timms_boxes_of_standard_normal_noise():
  n, size = 2000, 32
  erase = jax.jit(mixup.random_erasing, static_argnums=2)
  out = np.asarray(erase(jax.random.key(0), jnp.zeros((n, size, size, 1)), 1.0))[..., 0]
  erased = out != 0
  sizes = box_sizes(erased)
  reference = timm_erased_boxes(20_000, size, size, np.random.default_rng(0))
  grid = np.arange(size + 1)
  ecdf = lambda x: np.searchsorted(np.sort(x), grid, side='right') / len(x)
  for axis in (0, 1):  # Kolmogorov-Smirnov distance of heights and widths; 0.04 is chance at p = 0.001
    assert np.abs(ecdf(sizes[:, axis]) - ecdf(reference[:, axis])).max() < 0.045, axis
  noise = out[erased]
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
  half = np.asarray(erase(jax.random.key(1), jnp.zeros((n, size, size, 1)), 0.5))
  assert 0.45 < (half != 0).any((1, 2, 3)).mean() < 0.55
  x = jax.random.normal(jax.random.key(2), (4, size, size, 3))
  np.testing.assert_array_equal(mixup.random_erasing(jax.random.key(0), x, 0.0), x)


def test_erasing_follows_mixing_so_boxes_hold_pure_noise():
  # Image i is the constant 10 (i + 1): mixed pixels lie in [10, 40], N(0, 1) noise never near there.
  b, n = 4, 50
  images = jnp.broadcast_to(10.0 * jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None], (b, 24, 24, 3))
  augment = jax.jit(jax.vmap(lambda k: mixup.mix_then_erase(
      k, images, jnp.arange(b), num_classes=b, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0,
      erase_prob=1.0)))
  out, targets = jax.device_get(augment(jax.random.split(jax.random.key(0), n)))
  lam = targets[:, np.arange(b), np.arange(b)]
  c = 10.0 * np.arange(1, b + 1)
  mixed = lam * c + (1 - lam) * c[::-1]  # (n, b): each mixed image's value
  noise = np.abs(out) < 8
  # Outside the box, the mixed image unchanged: no noise from the partner's box blended in.
  np.testing.assert_allclose(out[~noise], np.broadcast_to(mixed[:, :, None, None, None], out.shape)[~noise], rtol=1e-5)
  # Inside, one box through every channel, of N(0, 1) noise unblended with either image.
  box = noise.all(-1)
  np.testing.assert_array_equal(noise, np.broadcast_to(box[..., None], noise.shape))
  assert (box_sizes(box.reshape(n * b, 24, 24)) > 0).all()
  assert abs(out[noise].mean()) < 0.03 and abs(out[noise].std() - 1) < 0.03
