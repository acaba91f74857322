"""Linear segmentation head on frozen dense features, its upsampling and its loss (spec section 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from locatvit_jax.data.seg_sources import IGNORE_INDEX

# The spec fixes the head's layers, not their init: PyTorch's Conv2d default, U(+-1/sqrt(fan_in)) for
# the weights, with zero biases.
_TORCH_CONV_KERNEL = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class SegHead(nnx.Module):
  """1x1 conv C -> hidden (no bias), GroupNorm(1 group), exact GELU, 1x1 conv hidden -> classes.

  A 1x1 convolution is a per-pixel linear map, so the convs are Linear layers on NHWC features.
  Computed in float32 whatever the backbone's dtype.
  """

  def __init__(self, in_features: int, num_classes: int, hidden: int = 512, *, rngs: nnx.Rngs):
    self.proj = nnx.Linear(in_features, hidden, use_bias=False, kernel_init=_TORCH_CONV_KERNEL, rngs=rngs)
    # One group: statistics over (h, w, hidden) of each image, as torch.nn.GroupNorm(1, hidden).
    self.norm = nnx.GroupNorm(hidden, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.classifier = nnx.Linear(hidden, num_classes, kernel_init=_TORCH_CONV_KERNEL, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    """features (B, h, w, C) -> logits float32 (B, h, w, num_classes)."""
    if features.ndim != 4:
      raise ValueError(f'features have shape {features.shape}; expected (batch, h, w, channels)')
    x = self.proj(features.astype(jnp.float32))
    x = nnx.gelu(self.norm(x), approximate=False)
    return self.classifier(x)


def upsample_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (B, h, w, K) logits to (B, H, W, K), as PyTorch/mmseg's
  interpolate(mode='bilinear', align_corners=False): half-pixel centres, no antialiasing."""
  b, _, _, k = logits.shape
  return jax.image.resize(logits, (b, *size, k), 'bilinear', antialias=False)


def logits_at_label_size(patch_logits: jax.Array, input_size: tuple[int, int], valid_size: jax.Array,
                         label_size: jax.Array, canvas: tuple[int, int]) -> jax.Array:
  """The whole-image evaluation's geometry for one image: (h', w', K) logits at the patch grid of an
  input padded bottom/right to `input_size` (static) -> logits at the original label's pixels.

  The logits are upsampled to the padded input (as in training), and its valid region, the resized
  image of size `valid_size` (h, w), is resized bilinearly to `label_size` (H, W) as PyTorch's
  interpolate(align_corners=False) does: half-pixel centres, edges clamped, no antialiasing.
  valid_size and label_size are traced int32 (2,) arrays, so one compilation serves every image with
  the same padded input and `canvas` (static, >= (H, W)): the result is (canvas[0], canvas[1], K), of
  which [:H, :W] are the label's pixels. Every resize of evaluation logits happens here.
  """
  logits = upsample_logits(patch_logits[None], input_size)[0]
  # Replicate the last valid row/column into the padding: bilinear taps past the valid region then
  # read its edge, which is PyTorch's clamping.
  rows = jnp.minimum(jnp.arange(input_size[0]), valid_size[0] - 1)
  cols = jnp.minimum(jnp.arange(input_size[1]), valid_size[1] - 1)
  logits = logits[rows][:, cols]
  scale = label_size.astype(jnp.float32) / valid_size.astype(jnp.float32)
  return jax.image.scale_and_translate(logits, (*canvas, logits.shape[-1]), (0, 1), scale, jnp.zeros(2),
                                       'linear', antialias=False)


def segmentation_loss(logits: jax.Array, mask: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """Mean cross-entropy over the pixels whose label is not `ignore_index`; 0 when there are none."""
  if logits.shape[:-1] != mask.shape:
    raise ValueError(f'logits {logits.shape} and mask {mask.shape} disagree; expected logits of shape '
                     'mask.shape + (num_classes,)')
  valid = mask != ignore_index
  labels = jnp.where(valid, mask, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(count, 1)
