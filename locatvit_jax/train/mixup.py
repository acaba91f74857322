"""The train step's batch augmentation, in the order of timm's prefetching loader (the authors' runs):
Mixup / CutMix with label smoothing (timm's `Mixup` in 'batch' mode), then random erasing of the
mixed, normalised images (timm's `RandomErasing` in 'pixel' mode).

Mixing is drawn per group of consecutive images, as timm draws it per GPU batch: one lambda per
group, every image mixed with its group flipped along the first axis. With both alphas > 0, CutMix
is chosen with probability `switch_prob`, else Mixup. CutMix pastes a box whose side is
sqrt(1 - lam) of the image around a uniform random centre, clipped to the image, and lam becomes the
fraction of pixels left unpasted. Pure JAX with static shapes, for use inside jit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def smoothed_one_hot(labels, num_classes: int, smoothing: float):
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box_mask(key, height: int, width: int, lam):
  """(height, width) float32 mask, 1 inside timm's CutMix box for `lam`, and its area fraction."""
  ky, kx = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  return inside.astype(jnp.float32), (bottom - top) * (right - left) / (height * width)


def _mix_group(key, images, targets, *, mixup_alpha, cutmix_alpha, switch_prob):
  """One draw for the whole of `images`: each is mixed with images[::-1]."""
  k_switch, k_mix, k_cut, k_box = jax.random.split(key, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # Draw only the lambdas of the enabled methods (jax.random.beta rejects alpha 0).
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0

  height, width = images.shape[1:3]
  box, box_area = cutmix_box_mask(k_box, height, width, lam_cut)
  # Both methods as one blend: x * keep + flip(x) * (1 - keep), with keep = lam (Mixup) or
  # 1 - box (CutMix), a per-pixel weight; one pass over the batch whichever was chosen.
  keep = jnp.where(use_cutmix, 1.0 - box, lam_mix)[None, :, :, None].astype(images.dtype)
  mixed = images * keep + images[::-1] * (1 - keep)
  lam = jnp.where(use_cutmix, 1.0 - box_area, lam_mix).astype(jnp.float32)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def mixup_cutmix(key, images, labels, *, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, group_size: int | None = None):
  """images (B, H, W, C), int labels (B,) -> (mixed images, float32 targets (B, num_classes)).

  Rows [k * group_size, (k + 1) * group_size) form group k, which draws on its own; group_size None
  (or >= B) makes the batch one group, drawn with `key` itself. Targets are
  lam * smooth(y) + (1 - lam) * smooth(flip(y)) within each group, with smooth(y) = one-hot at
  1 - smoothing + smoothing / num_classes and smoothing / num_classes elsewhere. With both alphas
  0 the images pass unchanged.
  """
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(f'images {images.shape} and labels {labels.shape}; expected (B, H, W, C) and (B,)')
  if num_classes < 1:
    raise ValueError(f'num_classes={num_classes}; expected >= 1')
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f'mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}; expected alphas >= 0 (0 disables)')
  if not 0 <= switch_prob <= 1:
    raise ValueError(f'switch_prob={switch_prob}; expected a probability in [0, 1]')
  if not 0 <= label_smoothing < 1:
    raise ValueError(f'label_smoothing={label_smoothing}; expected a value in [0, 1)')
  batch = images.shape[0]
  group = batch if group_size is None else min(group_size, batch)
  if group < 1 or batch % group:
    raise ValueError(f'group_size={group_size} for a batch of {batch}; expected a divisor of the batch, '
                     'or at least the batch (one group)')

  targets = smoothed_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, targets
  mix = functools.partial(_mix_group, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob)
  if group == batch:
    return mix(key, images, targets)
  n = batch // group
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n))
  mixed, targets = jax.vmap(mix)(keys, images.reshape((n, group) + images.shape[1:]), targets.reshape(n, group, -1))
  return mixed.reshape(images.shape), targets.reshape(batch, num_classes)


def _erase_image(key, image, *, prob, min_area, max_area, min_aspect, attempts):
  height, width, _ = image.shape
  k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
  # timm's attempts, all drawn at once: area fraction uniform, aspect log-uniform; the first box
  # that fits strictly inside the image is erased, and none if no attempt fits.
  area = jax.random.uniform(k_area, (attempts,), minval=min_area, maxval=max_area) * (height * width)
  aspect = jnp.exp(jax.random.uniform(k_aspect, (attempts,), minval=math.log(min_aspect),
                                      maxval=-math.log(min_aspect)))
  hs = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  ws = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (hs < height) & (ws < width)
  first = jnp.argmax(fits)
  h, w = hs[first], ws[first]
  top = jax.random.randint(k_top, (), 0, height - h + 1)
  left = jax.random.randint(k_left, (), 0, width - w + 1)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  box &= (jax.random.uniform(k_apply) < prob) & fits.any()
  return jnp.where(box[:, :, None], jax.random.normal(k_noise, image.shape, image.dtype), image)


def random_erasing(key, images, prob: float, *, min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, attempts: int = 10):
  """timm's RandomErasing(mode='pixel', one box) on a normalised batch (B, H, W, C), image by image:
  with probability `prob`, a box of min_area..max_area of the image, aspect min_aspect..1/min_aspect,
  becomes per-pixel N(0, 1) noise in every channel. Image i draws with fold_in(key, i)."""
  if not 0 <= prob <= 1:
    raise ValueError(f'prob={prob}; expected a probability in [0, 1]')
  if prob == 0:
    return images
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(images.shape[0]))
  erase = functools.partial(_erase_image, prob=prob, min_area=min_area, max_area=max_area,
                            min_aspect=min_aspect, attempts=attempts)
  return jax.vmap(erase)(keys, images)


def mix_then_erase(key, images, labels, *, erase_prob: float, **mix_kwargs):
  """mixup_cutmix(..., **mix_kwargs), then random_erasing of the mixed images with `erase_prob`:
  timm's order when its loader prefetches, so an erased box is pure noise, never blended."""
  mix_key, erase_key = jax.random.split(key)
  images, targets = mixup_cutmix(mix_key, images, labels, **mix_kwargs)
  return random_erasing(erase_key, images, erase_prob), targets
