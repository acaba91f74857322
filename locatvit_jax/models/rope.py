"""RoPE-Mixed ViT with LocAt switches: timm's `Eva` blocks as the authors build them (spec section 8).

What differs from models/vit.py:
* no absolute position embedding: every block rotates the patch tokens' q and k by 2-D angles
  `x * f_x + y * f_y` with learnable frequencies per block and head (`rope/freqs`, (2, depth, heads,
  head_dim / 2); "mixed" mode, Heo et al. 2024). The class token is never rotated;
* layer scale: each residual branch is multiplied by a learned per-channel `gamma` (init 1e-5);
* timm's Eva init: class token truncated normal 0.02, attention and MLP output kernels divided by
  sqrt(2 * block number), head kernel scaled by 1e-3.

GAug reads each block's q *before* the rotation (the authors' GaussianAugmentedAttentionRope), so its
variance and strength depend on content, not position; then q and k are rotated and the same attention
kernels as the ViT's run (models/attention.py). The rotary grid is the input's: any image whose sides are
multiples of the patch size works, and GAug rescales its variances as in the ViT.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from locatvit_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from locatvit_jax.models import init, locat, registry, vit

FAMILY = 'rope'

# size: (width, depth, heads, mlp_dim, drop_path). The authors register LocAt at tiny and base (their
# models/ropevit.py); drop path as their train.py picks it from the name ('tiny' 0.1, 'base' 0.4).
SIZES = {
    'tiny': (192, 12, 3, 768, 0.1),
    'base': (768, 12, 12, 3072, 0.4),
}
MODEL_NAMES = tuple(f'{kind}_{size}_rope_mixed' for size in SIZES for kind in ('vit', 'locatvit'))
# The authors' locatvit_*_rope_mixed are our names; their baseline and timm's plain model of the same
# architecture are vit_{tiny,base}_patch16_rope_mixed_224 (timm's Eva; the authors register tiny).
MODEL_ALIASES = {f'vit_{size}_patch16_rope_mixed_224': f'vit_{size}_rope_mixed' for size in SIZES}

VARIANTS = {
    'locat': dict(gaug=True, prr=True),
    'vit': dict(gaug=False, prr=False),
    'gaug': dict(gaug=True, prr=False),
    'prr': dict(gaug=False, prr=True),
}

# (mean, std) of [0, 1] RGB: the authors' default_cfgs for these models (models/ropevit.py) have
# ImageNet's, which their train.py resolves, not the ViT's 0.5.
NORMALIZATION = (IMAGENET_MEAN, IMAGENET_STD)
# Our paths of what timm's Eva.no_weight_decay() adds to the usual rule: the rotary frequencies.
NO_WEIGHT_DECAY = ('rope/freqs',)


@dataclasses.dataclass(frozen=True)
class RoPEConfig(vit.PatchTokens, registry.ModelConfig):
  """A RoPE-Mixed ViT: class token, no position embedding, layer scale. Serialised next to params."""

  FAMILY: ClassVar[str] = FAMILY

  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  patch_size: int = 16
  img_size: tuple[int, int] = (224, 224)  # the grid GAug's constants are built for
  num_classes: int = 1000  # 0: no head, the model returns pooled features
  gaug: bool = True
  prr: bool = True
  rope_temperature: float = 10.0  # base of the initial frequencies' magnitudes
  init_values: float = 1e-5  # layer scale's initial gamma
  drop_path: float = 0.0  # the last block's rate; linear from 0 over depth
  dtype: str = 'float32'  # matmul dtype; params, norms, rotation angles, GAug and softmax stay float32
  gaug_impl: str = 'fused'
  remat: str = 'none'

  def __post_init__(self):
    object.__setattr__(self, 'img_size', vit._pair(self.img_size))
    positive = {'width': self.width, 'depth': self.depth, 'num_heads': self.num_heads,
                'mlp_dim': self.mlp_dim, 'patch_size': self.patch_size, 'img_size': min(self.img_size),
                'rope_temperature': self.rope_temperature}
    self.validate(positive, [
        (self.width % self.num_heads == 0, f'width={self.width} must be a multiple of num_heads={self.num_heads}'),
        # Mixed RoPE splits each head's channels into pairs, half of them per frequency family.
        ((self.width // self.num_heads) % 4 == 0,
         f'head dim {self.width}/{self.num_heads} must be a multiple of 4 for 2-D rotary embeddings'),
    ])

  @property
  def num_prefix(self) -> int:
    return 1  # the class token

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def model_config(name: str, **overrides) -> RoPEConfig:
  """`locatvit_tiny_rope_mixed` (or an alias) -> its RoPEConfig; config fields as overrides."""
  ours = MODEL_ALIASES.get(name, name)
  if ours not in MODEL_NAMES:
    raise ValueError(f'unknown model name {name!r}; expected one of {MODEL_NAMES} or {tuple(MODEL_ALIASES)}')
  kind, size = ours.split('_')[:2]
  width, depth, heads, mlp, dpr = SIZES[size]
  base = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, drop_path=dpr,
              **VARIANTS['locat' if kind == 'locatvit' else 'vit'])
  base.update(overrides)
  return RoPEConfig.from_dict(base)


# -- rotary embedding ---------------------------------------------------------------------------
def init_freqs(key, depth: int, num_heads: int, head_dim: int, temperature: float) -> jax.Array:
  """timm's initial mixed frequencies (2, depth, heads, head_dim / 2): magnitudes
  temperature^(-4m / head_dim), m < head_dim / 4, on two perpendicular directions at a random angle
  per block and head; row 0 multiplies x (column), row 1 y (row)."""
  mag = temperature ** -(jnp.arange(0, head_dim, 4, dtype=jnp.float32) / head_dim)
  angle = jax.random.uniform(key, (depth, num_heads, 1), jnp.float32, 0.0, 2 * math.pi)
  fx = jnp.concatenate([mag * jnp.cos(angle), mag * jnp.cos(angle + math.pi / 2)], axis=-1)
  fy = jnp.concatenate([mag * jnp.sin(angle), mag * jnp.sin(angle + math.pi / 2)], axis=-1)
  return jnp.stack([fx, fy])


class MixedRotary(nnx.Module):
  """The learnable frequencies of every block; `angles(grid)` turns them into rotation angles."""

  def __init__(self, cfg: RoPEConfig, rngs: nnx.Rngs):
    self.freqs = nnx.Param(init_freqs(rngs.params(), cfg.depth, cfg.num_heads, cfg.head_dim,
                                      cfg.rope_temperature))

  def angles(self, grid: tuple[int, int]) -> jax.Array:
    """(depth, heads, h*w, head_dim / 2) angles of the patches in row-major order. timm's 'xy'
    indexing: x is the column and y the row, counted in patches from 0."""
    h, w = grid
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij')
    f = self.freqs[...].astype(jnp.float32)
    return x.reshape(-1, 1) * f[0, :, :, None] + y.reshape(-1, 1) * f[1, :, :, None]


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates channel pairs (2m, 2m + 1) of x (B, H, n, d) by the angles whose cos, sin are
  (H, n, d / 2), in float32; returns x's dtype."""
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  even, odd = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# -- blocks -------------------------------------------------------------------------------------
def rotate_patches(t: jax.Array, cos: jax.Array, sin: jax.Array, num_prefix: int) -> jax.Array:
  """q or k (B, H, N, d) with the patch tokens rotated; the prefix (class) token is never rotated."""
  return jnp.concatenate([t[:, :, :num_prefix], rotate(t[:, :, num_prefix:], cos, sin)], axis=2)


class RopeAttention(vit.Attention):
  """vit.Attention (GAug reads q before the rotation; the same sown statistics) whose output kernel is
  drawn at timm Eva's depth-dependent scale; the block passes the rotation."""

  def __init__(self, cfg: RoPEConfig, out_scale: float, rngs: nnx.Rngs):
    super().__init__(cfg, rngs)
    self.proj.kernel[...] = self.proj.kernel[...] * out_scale


def _scaled(initializer, scale: float):
  """`initializer`'s draw times `scale` (timm's Eva rescales some kernels after drawing them)."""
  return lambda key, shape, dtype=jnp.float32: initializer(key, shape, dtype) * scale


class LayerScaleMlp(vit.Mlp):
  """vit.Mlp with the output kernel drawn at timm Eva's depth-dependent scale."""

  def __init__(self, width, hidden, dtype, out_scale, rngs):
    super().__init__(width, hidden, dtype, rngs)
    self.fc2.kernel[...] = self.fc2.kernel[...] * out_scale


class Block(nnx.Module):
  """Pre-norm block with layer scale: x + gamma_1 * attn(LN(x)), then x + gamma_2 * mlp(LN(x))."""

  def __init__(self, cfg: RoPEConfig, index: int, drop_path: float, rngs: nnx.Rngs, drop_rngs: nnx.Rngs):
    ln = lambda: nnx.LayerNorm(cfg.width, epsilon=1e-6, rngs=rngs)
    out_scale = 1.0 / math.sqrt(2.0 * (index + 1))  # timm Eva's fix_init_weight
    self.norm1 = ln()
    self.attn = RopeAttention(cfg, out_scale, rngs)
    self.gamma_1 = nnx.Param(jnp.full((cfg.width,), cfg.init_values, jnp.float32))
    self.norm2 = ln()
    self.mlp = LayerScaleMlp(cfg.width, cfg.mlp_dim, vit.DTYPES[cfg.dtype], out_scale, rngs)
    self.gamma_2 = nnx.Param(jnp.full((cfg.width,), cfg.init_values, jnp.float32))
    self.drop_path1 = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=drop_rngs)
    self.drop_path2 = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=drop_rngs)

  def __call__(self, x, grid, num_prefix, cos, sin):
    rotate = functools.partial(rotate_patches, cos=cos, sin=sin, num_prefix=num_prefix)
    a = self.attn(self.norm1(x), grid, num_prefix, rotate).astype(x.dtype)
    x = x + self.drop_path1(self.gamma_1[...] * a)
    return x + self.drop_path2(self.gamma_2[...] * self.mlp(self.norm2(x)).astype(x.dtype))


class RoPEViT(vit.ViT):
  """RoPE-Mixed ViT / LocAt RoPE-Mixed ViT. `model(images)` -> logits; `model.features(images)` ->
  (B, h, w, C): the last block's patch tokens, no final norm, no PRR (vit.ViT's, as are the image checks
  and the head; the tokens, blocks and pooling are this family's)."""

  HEAD_INIT_SCALE = 1e-3  # timm Eva's head_init_scale

  def __init__(self, cfg: RoPEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, p = cfg.width, cfg.patch_size
    self.patch_embed = vit.PatchConv(c, p, vit.DTYPES[cfg.dtype], rngs)  # Eva's init touches Linear layers only
    self.cls_token = nnx.Param(init.TRUNC_NORMAL(rngs.params(), (1, 1, c)))
    self.rope = MixedRotary(cfg, rngs)
    rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    drop_rngs = nnx.Rngs(dropout=rngs['dropout']())  # as vit.ViT: reseedable per step
    self.blocks = nnx.List([Block(cfg, i, r, rngs, drop_rngs) for i, r in enumerate(rates)])
    self.norm = nnx.LayerNorm(c, epsilon=1e-6, rngs=rngs)
    self.head = (nnx.Linear(c, cfg.num_classes, kernel_init=_scaled(init.TRUNC_NORMAL, self.HEAD_INIT_SCALE),
                            bias_init=init.ZEROS, rngs=rngs) if cfg.num_classes else None)

  def embed(self, images: jax.Array):
    """Class token followed by the patch tokens, nothing added: (B, 1 + h*w, C), grid."""
    grid = self.grid_of(images)
    x = self.patch_embed(images).astype(jnp.float32)
    b = x.shape[0]
    x = x.reshape(b, grid[0] * grid[1], -1)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1]))
    return jnp.concatenate([cls, x], axis=1), grid

  def encode(self, images: jax.Array, layers: Sequence[int] = ()):
    """Runs the blocks. Returns the last block's tokens, the grid, and the tokens after `layers`."""
    x, grid = self.embed(images)
    angles = self.rope.angles(grid)
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # once for all blocks: (depth, heads, hw, d / 2)
    npre = self.cfg.num_prefix
    taps = []
    for i, blk in enumerate(self.blocks):
      if self.cfg.remat == 'none':
        x = blk(x, grid, npre, cos[i], sin[i])
      else:
        x = nnx.remat(lambda m, y, c_, s_: m(y, grid, npre, c_, s_),
                      policy=vit.REMAT_POLICIES[self.cfg.remat])(blk, x, cos[i], sin[i])
      if i in layers:
        taps.append(x)
    return x, grid, taps

  def pooled_features(self, images: jax.Array) -> jax.Array:
    """What the head reads: the class token after the final norm and PRR, (B, C)."""
    x, _, _ = self.encode(images)
    x = self.norm(x)
    if self.cfg.prr:
      x = locat.prr(x, self.cfg.num_heads, num_queries=1)
    return x[:, 0]


# The registry's handles on this family (models/registry.py).
Config = RoPEConfig
Model = RoPEViT
