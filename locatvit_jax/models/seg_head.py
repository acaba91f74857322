"""Linear segmentation head on frozen dense features, its upsampling and its loss (spec section 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from locatvit_jax.data.seg_sources import IGNORE_INDEX
from locatvit_jax.models import vit

# The authors' head is an mmseg decode head, initialised by mmcv: the C -> hidden conv of its ConvModule
# by kaiming_init (normal, mode fan_out, gain of ReLU: std sqrt(2 / hidden)), its GroupNorm to weight 1 and
# bias 0 (flax's default), and the classifier (conv_seg) by BaseDecodeHead's init_cfg, normal(0, 0.01)
# with a zero bias.
_KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_CLASSIFIER_KERNEL = nnx.initializers.normal(0.01)


class SegHead(nnx.Module):
  """1x1 conv C -> hidden (no bias), GroupNorm(1 group), exact GELU, 1x1 conv hidden -> classes.

  A 1x1 convolution is a per-pixel linear map, so the convs are Linear layers on NHWC features.
  Computed in float32 whatever the backbone's dtype.
  """

  def __init__(self, in_features: int, num_classes: int, hidden: int = 512, *, rngs: nnx.Rngs):
    self.proj = vit.Linear(in_features, hidden, use_bias=False, kernel_init=_KAIMING_FAN_OUT, rngs=rngs)
    # One group: statistics over (h, w, hidden) of each image, as torch.nn.GroupNorm(1, hidden).
    self.norm = nnx.GroupNorm(hidden, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.classifier = vit.Linear(hidden, num_classes, kernel_init=_CLASSIFIER_KERNEL, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    """features (B, h, w, C) -> logits float32 (B, h, w, num_classes)."""
    if features.ndim != 4:
      raise ValueError(f'features have shape {features.shape}; expected (batch, h, w, channels)')
    x = self.proj(features.astype(jnp.float32))
    x = vit.gelu(self.norm(x))
    return self.classifier(x)


def upsample_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of (B, h, w, K) logits to (B, H, W, K), as PyTorch/mmseg's
  interpolate(mode='bilinear', align_corners=False): half-pixel centres, no antialiasing."""
  b, _, _, k = logits.shape
  return jax.image.resize(logits, (b, *size, k), 'bilinear', antialias=False)


EVAL_GEOMETRIES = ('reference', 'crop')


def logits_at_label_size(patch_logits: jax.Array, input_size: tuple[int, int], valid_size: jax.Array,
                         label_size: jax.Array, canvas: tuple[int, int], geometry: str = 'reference') -> jax.Array:
  """The whole-image evaluation's geometry for one image: (h', w', K) logits at the patch grid of an
  input padded bottom/right to `input_size` (static) -> logits at the original label's pixels.

  The input holds the resized image, of size `valid_size` (h, w), and its padding. `geometry`:
    'reference': as mmseg's whole-mode inference on the authors' backbone (timm pads the image to the
      patch multiple inside the model): the grid's logits are resized to (h, w), so the padded grid is
      stretched over the image, then to the label size.
    'crop': the grid's logits are upsampled to the padded input, as in training, and only their valid
      (h, w) region is resized to the label size: every logit stays over the pixels it was computed for.
  Every resize is PyTorch's interpolate(mode='bilinear', align_corners=False): half-pixel centres, edges
  clamped, no antialiasing. valid_size and label_size are traced int32 (2,) arrays, so one compilation
  serves every image with the same padded input and `canvas` (static, >= (H, W)): the result is
  (canvas[0], canvas[1], K), of which [:H, :W] are the label's pixels. Every resize of evaluation logits
  happens here.
  """
  k = patch_logits.shape[-1]
  if geometry == 'reference':
    # To (h, w) inside an input_size buffer; what lies past (h, w) is overwritten just below.
    scale = valid_size.astype(jnp.float32) / jnp.array(patch_logits.shape[:2], jnp.float32)
    logits = jax.image.scale_and_translate(patch_logits, (*input_size, k), (0, 1), scale, jnp.zeros(2),
                                           'linear', antialias=False)
  elif geometry == 'crop':
    logits = upsample_logits(patch_logits[None], input_size)[0]
  else:
    raise ValueError(f'geometry={geometry!r}; expected one of {EVAL_GEOMETRIES}')
  # Replicate the last valid row/column into the padding: bilinear taps past the valid region then
  # read its edge, which is PyTorch's clamping.
  rows = jnp.minimum(jnp.arange(input_size[0]), valid_size[0] - 1)
  cols = jnp.minimum(jnp.arange(input_size[1]), valid_size[1] - 1)
  logits = logits[rows][:, cols]
  scale = label_size.astype(jnp.float32) / valid_size.astype(jnp.float32)
  return jax.image.scale_and_translate(logits, (*canvas, k), (0, 1), scale, jnp.zeros(2),
                                       'linear', antialias=False)


LOSS_AVERAGES = ('all', 'labelled')


def segmentation_loss(logits: jax.Array, mask: jax.Array, ignore_index: int = IGNORE_INDEX,
                      average: str = 'all') -> jax.Array:
  """Per-pixel cross-entropy, summed over the pixels whose label is not `ignore_index`, divided by
  the number of all pixels ('all': mmseg's CrossEntropyLoss default, avg_non_ignore=False, so ignored
  and padded pixels dilute the loss) or of the labelled ones ('labelled': PyTorch's mean; 0 when
  there are none)."""
  if logits.shape[:-1] != mask.shape:
    raise ValueError(f'logits {logits.shape} and mask {mask.shape} disagree; expected logits of shape '
                     'mask.shape + (num_classes,)')
  if average not in LOSS_AVERAGES:
    raise ValueError(f'average={average!r}; expected one of {LOSS_AVERAGES}')
  valid = mask != ignore_index
  labels = jnp.where(valid, mask, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  count = mask.size if average == 'all' else jnp.maximum(jnp.sum(valid), 1)
  return jnp.sum(jnp.where(valid, losses, 0.0)) / count
