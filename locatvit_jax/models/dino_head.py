"""DINO's model pieces (Caron et al. 2021; facebookresearch/dino, run by the authors as evaluations/dino).

* `DINOHead`: 3-layer MLP (GELU; optionally BatchNorm before each GELU, DINO's --use_bn_in_head) to a
  bottleneck, L2-normalised, then a weight-normalised linear layer without bias: the direction
  `last_layer` (bottleneck, out_dim), each output's column divided by its norm, times a gain fixed at
  1 (DINO's default --norm_last_layer true) or, with norm_last_layer=False, the parameter
  `last_layer_gain` (1, out_dim), PyTorch's weight_g (out_dim, 1) transposed, starting at 1.
* `DinoViT`: our ViT (any variant) with DINO's position-embedding interpolation for crops whose grid
  differs from the one it was built for (the 96 px local crops). DINO's interpolate_pos_encoding calls
  PyTorch's bicubic interpolate with scale_factor (g + 0.1) / g0 and no antialiasing: Keys' cubic with
  a = -0.75, source positions (dst + 0.5) * g0 / (g + 0.1) - 0.5, edge samples repeated. timm (and
  vit.resample_pos_embed) resizes to the grid with antialias, a = -0.5: at 14 -> 6 the two differ.
  Everything else (GAug and its variance rescaling, PRR after the final norm, the class token as the
  output) is the ViT's own.
* `DINO`: backbone + head on the two crop sizes, as DINO's MultiCropWrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from locatvit_jax.models import init, vit

# PyTorch's non-antialiased bicubic kernel parameter (upsample_bicubic2d); jax.image.resize uses -0.5.
TORCH_CUBIC_A = -0.75
# PyTorch's BatchNorm1d default.
BATCH_NORM_EPS = 1e-5
# DINO adds this to the target grid before dividing, "to avoid floating point error in the interpolation".
DINO_GRID_OFFSET = 0.1


def _cubic_weights(t: float, a: float = TORCH_CUBIC_A) -> list[float]:
  """Weights of the 4 taps at offsets -1, 0, 1, 2 for a sample at fraction t past tap 0."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@functools.lru_cache(maxsize=None)
def dino_interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of PyTorch's interpolate(mode='bicubic', align_corners=False) along one axis
  with scale_factor (n_out + 0.1) / n_in, as DINO calls it (module docstring)."""
  ratio = n_in / (n_out + DINO_GRID_OFFSET)
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * ratio - 0.5  # not clamped at 0 for cubic
    x0 = int(np.floor(src))
    for k, w in zip(range(-1, 3), _cubic_weights(src - x0)):
      m[i, min(max(x0 + k, 0), n_in - 1)] += w  # taps outside the grid repeat its edge
  return m


def dino_resample_pos_embed(pos_embed: jax.Array, num_prefix: int, grid0, grid) -> jax.Array:
  """DINO's interpolate_pos_encoding: prefix rows kept, patch rows resampled (module docstring)."""
  if tuple(grid) == tuple(grid0):
    return pos_embed
  prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
  c = pos_embed.shape[-1]
  img = patches.reshape(grid0[0], grid0[1], c).astype(jnp.float32)
  rows = jnp.asarray(dino_interpolation_matrix(grid0[0], grid[0]), jnp.float32)
  cols = jnp.asarray(dino_interpolation_matrix(grid0[1], grid[1]), jnp.float32)
  out = jnp.einsum('ih,hwc,jw->ijc', rows, img, cols, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([prefix, out.reshape(1, grid[0] * grid[1], c).astype(pos_embed.dtype)], 1)


class DinoViT(vit.ViT):
  """The ViT with DINO's position-embedding interpolation (module docstring); same parameters, so its
  params export is an ordinary ViT's."""

  def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
    return dino_resample_pos_embed(self.pos_embed[...], self.cfg.num_prefix, self.cfg.grid, grid)


class HeadBatchNorm(nnx.Module):
  """PyTorch's BatchNorm1d in training mode, the only mode DINO runs its heads in (it never calls
  eval() on the student or the teacher): each feature standardised with the mean and biased variance
  of every row (all crops of the global batch: a mean over a global array is SyncBatchNorm), then
  scaled and shifted. Running averages would never be read, so none are kept."""

  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1])
    mean = jnp.mean(rows, axis=0)
    var = jnp.mean(jnp.square(rows - mean), axis=0)
    return (x - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * self.scale[...] + self.bias[...]


class DINOHead(nnx.Module):
  """DINO's projection head (module docstring). Parameters: mlp/{0,1,2}/{kernel,bias}, last_layer,
  with `use_bn` (DINO's --use_bn_in_head) norms/{0,1}/{scale,bias} after the hidden layers, and
  without `norm_last_layer` the last layer's trained gain last_layer_gain."""

  def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
               nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True, rngs: nnx.Rngs):
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    self.mlp = nnx.List([nnx.Linear(i, o, kernel_init=init.TRUNC_NORMAL, bias_init=init.ZEROS, rngs=rngs)
                         for i, o in zip(dims, dims[1:])])
    self.norms = nnx.List([HeadBatchNorm(hidden_dim) for _ in range(nlayers - 1)]) if use_bn else None
    # DINO creates the last layer after its trunc_normal init pass, so it keeps PyTorch's default Linear
    # init, U(+-1/sqrt(fan_in)) (torch_conv_default is the same rule).
    self.last_layer = nnx.Param(init.torch_conv_default(bottleneck_dim)(rngs.params(), (bottleneck_dim, out_dim)))
    self.last_layer_gain = None if norm_last_layer else nnx.Param(jnp.ones((1, out_dim), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        if self.norms is not None:
          x = self.norms[i](x)
        x = vit.gelu(x)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
    v = self.last_layer[...]
    # weight_norm: each output's weight vector has norm g (PyTorch adds no epsilon).
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    return x @ (w if self.last_layer_gain is None else w * self.last_layer_gain[...])


class DINO(nnx.Module):
  """Backbone + DINOHead over a batch of global crops and, for the student, local crops.

  `model(global_crops, local_crops)`: crops as (B, V, H, W, 3) per size -> logits (B, V_global + V_local,
  out_dim). Each size is one backbone call (DINO's MultiCropWrapper), the head one call on all.
  """

  def __init__(self, backbone_cfg: vit.ViTConfig, out_dim: int, *, hidden_dim: int = 2048,
               bottleneck_dim: int = 256, use_bn: bool = False, norm_last_layer: bool = True, rngs: nnx.Rngs):
    if backbone_cfg.FAMILY != vit.FAMILY or backbone_cfg.num_classes:
      raise ValueError(f'DINO needs a ViT-family backbone without a classifier (num_classes=0); got a '
                       f'{backbone_cfg.FAMILY!r} model with num_classes={backbone_cfg.num_classes}')
    self.backbone = DinoViT(backbone_cfg, rngs=rngs)
    if self.backbone.cls_token is not None:  # DINO's ViT: trunc_normal(std=0.02), timm's: normal(1e-6)
      self.backbone.cls_token[...] = init.TRUNC_NORMAL(rngs.params(), self.backbone.cls_token.shape)
    self.dino_head = DINOHead(backbone_cfg.feature_dim, out_dim, hidden_dim=hidden_dim,
                              bottleneck_dim=bottleneck_dim, use_bn=use_bn, norm_last_layer=norm_last_layer,
                              rngs=rngs)

  def __call__(self, global_crops: jax.Array, local_crops: jax.Array | None = None) -> jax.Array:
    feats = [self._features(global_crops)]
    if local_crops is not None:
      feats.append(self._features(local_crops))
    return self.dino_head(jnp.concatenate(feats, axis=1))

  def _features(self, crops: jax.Array) -> jax.Array:
    b, v = crops.shape[:2]
    # Image-major rows (image 0's crops, then image 1's): each device keeps its own images' crops.
    return self.backbone(crops.reshape((b * v,) + crops.shape[2:])).reshape(b, v, -1)
