"""Mixup / CutMix with label smoothing on a global batch, as timm's `Mixup` in 'batch' mode.

One lambda per batch; every image is mixed with the batch flipped along its first axis. With both
alphas > 0, CutMix is chosen with probability `switch_prob`, else Mixup. CutMix pastes a box whose
side is sqrt(1 - lam) of the image around a uniform random centre, clipped to the image, and lam
becomes the fraction of pixels left unpasted. Pure JAX with static shapes, for use inside jit.
"""

from __future__ import annotations

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


def mixup_cutmix(key, images, labels, *, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1):
  """images (B, H, W, C), int labels (B,) -> (mixed images, float32 targets (B, num_classes)).

  Targets are lam * smooth(y) + (1 - lam) * smooth(flip(y)) with smooth(y) = one-hot at
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

  targets = smoothed_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, targets

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
