"""Swin Transformer with LocAt switches: timm 1.0.19's SwinTransformer as the authors build it.

What LocAt changes (the authors' models/swin.py, spec section 8):
* GAug inside every window attention, with the window as the grid (7 x 7 at 224 px, no prefix tokens):
  its bias S is added to the logits on top of the relative position bias and, in shifted blocks, the
  shifted-window mask. The same attention kernels as the ViT's run (models/attention.py), with the
  relative position bias + mask as their extra logits bias.
* PRR on the last stage's output after the final norm, over all its tokens, with the last stage's
  heads, before the average pooling that the head reads.

Everything else is timm's: patch embedding (4 x 4 conv + LayerNorm), stages of pre-norm blocks
alternating plain and shifted windows (shift = window // 2), 2 x 2 patch merging (LayerNorm over the
4C concatenation, then a linear map without bias) before every stage but the first, LayerNorm eps 1e-5
(PyTorch's default) everywhere, average pooling, linear head. Drop path linear from 0 over all blocks.

Window and shift are fixed per block by the resolution the model was built for, as timm fixes them:
a stage whose built grid is no larger than the window uses the grid as its window and never shifts.
Any other input size runs as the authors run Swin for segmentation (timm's `strict_img_size=False`,
which their backbone turns into `dynamic_img_pad`): the image is zero-padded to whole patches, each
block zero-pads its (normed, shifted) map to whole windows and builds the shift mask on the padded
grid, patch merging pads odd sides. At the built size all of that is the identity.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from locatvit_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from locatvit_jax.models import attention, init, locat, registry, vit

FAMILY = 'swin'

# size: (embed_dim, depths, num_heads, drop_path). Drop path as the authors' train.py picks it from the
# model name ('tiny' 0.1, 'base' 0.4).
SIZES = {
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24), 0.1),
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32), 0.4),
}
MODEL_NAMES = tuple(f'{kind}_{size}' for size in SIZES for kind in ('swin', 'locatswin'))
# timm's plain Swins of these sizes; the authors' locatswin_* are our names.
MODEL_ALIASES = {f'swin_{size}_patch4_window7_224': f'swin_{size}' for size in SIZES}

VARIANTS = {
    'locat': dict(gaug=True, prr=True),  # LocAt Swin
    'vit': dict(gaug=False, prr=False),  # plain Swin baseline (the name every family gives its baseline)
    'gaug': dict(gaug=True, prr=False),
    'prr': dict(gaug=False, prr=True),
}

# (mean, std) of [0, 1] RGB: timm's Swin default config (its _cfg, which the authors' locatswin_* reuse and
# their train.py resolves) has ImageNet's, not the ViT's 0.5.
NORMALIZATION = (IMAGENET_MEAN, IMAGENET_STD)
# timm's SwinTransformer.no_weight_decay(): the relative position bias tables are not decayed.
NO_WEIGHT_DECAY = ('relative_position_bias_table',)
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which timm's Swin uses
SHIFT_MASK = -100.0  # timm's value between tokens of different regions in a shifted window


@dataclasses.dataclass(frozen=True)
class SwinConfig(registry.ModelConfig):
  """A Swin Transformer. Serialised next to params."""

  FAMILY: ClassVar[str] = FAMILY

  embed_dim: int = 96  # stage 0's width; stage i has embed_dim * 2**i
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  patch_size: int = 4
  img_size: tuple[int, int] = (224, 224)  # fixes each block's window and shift (module docstring)
  num_classes: int = 1000  # 0: no head, the model returns pooled features
  gaug: bool = True
  prr: bool = True
  drop_path: float = 0.1  # the last block's rate; linear from 0 over all blocks
  dtype: str = 'float32'  # matmul dtype; params, norms, GAug and softmax stay float32
  # 'dense' for 49-token windows: LocAt Swin-T's train step took 1.076x plain Swin-T's against fused's
  # 1.170x (benchmarks/train_step.py --pair, 224 px, batch 8, 2-core CPU); at N = 49 the N x N tensors
  # are small, and XLA fuses dense's plain autodiff better than fused's custom VJP.
  gaug_impl: str = 'dense'
  remat: str = 'none'

  def __post_init__(self):
    object.__setattr__(self, 'img_size', vit._pair(self.img_size))
    object.__setattr__(self, 'depths', tuple(int(d) for d in self.depths))
    object.__setattr__(self, 'num_heads', tuple(int(h) for h in self.num_heads))
    positive = {'embed_dim': self.embed_dim, 'window_size': self.window_size, 'mlp_ratio': self.mlp_ratio,
                'patch_size': self.patch_size, 'img_size': min(self.img_size),
                'depths': min(self.depths, default=0), 'num_heads': min(self.num_heads, default=0)}
    self.validate(positive, [
        (len(self.depths) == len(self.num_heads),
         f'depths={self.depths} and num_heads={self.num_heads}; expected one entry per stage in each'),
        (all(w % h == 0 for w, h in zip(self.stage_dims, self.num_heads)),
         f'stage widths {self.stage_dims} must be multiples of num_heads={self.num_heads}'),
    ])
    if self.gaug and self.gaug_impl in ('pallas', 'pallas_interpret'):
      # Every Swin block adds the relative position bias, which the Pallas kernels do not take.
      raise ValueError(f"gaug_impl={self.gaug_impl!r} takes no relative position bias; "
                       "expected 'dense', 'fused' or 'blockwise' for Swin")

  @property
  def depth(self) -> int:
    """Attention blocks over all stages."""
    return sum(self.depths)

  @property
  def stage_dims(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

  @property
  def grid(self) -> tuple[int, int]:
    return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

  @property
  def feature_dim(self) -> int:
    """Channels of features(): the last stage's width."""
    return self.stage_dims[-1]

  @property
  def feature_stride(self) -> int:
    """Pixels per cell of features() (the last stage)."""
    return self.stage_stride(len(self.depths) - 1)

  def stage_stride(self, stage: int) -> int:
    return self.patch_size * 2 ** stage

  def stage_resolution(self, stage: int) -> tuple[int, int]:
    """A stage's grid at the built size as timm computes it (it fixes windows and shifts): stage i > 0
    halves, rounding down, the grid divided by 2**(i - 1)."""
    if stage == 0:
      return self.grid
    return tuple(g // 2 ** (stage - 1) // 2 for g in self.grid)

  def window_and_shift(self, stage: int, shifted: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's per-block rule: an axis no longer than the window takes its length as the window and
    does not shift."""
    w = self.window_size
    res = self.stage_resolution(stage)
    window = tuple(min(r, w) for r in res)
    shift = tuple(0 if r <= w or not shifted else w // 2 for r in res)
    return window, shift


def model_config(name: str, **overrides) -> SwinConfig:
  """`locatswin_tiny` (or `swin_tiny_patch4_window7_224`, ...) -> SwinConfig; overrides win."""
  ours = MODEL_ALIASES.get(name, name)
  if ours not in MODEL_NAMES:
    raise ValueError(f'unknown model name {name!r}; expected one of {MODEL_NAMES} or {tuple(MODEL_ALIASES)}')
  kind, size = ours.split('_')
  embed_dim, depths, heads, dpr = SIZES[size]
  locat_on = kind == 'locatswin'
  base = dict(embed_dim=embed_dim, depths=depths, num_heads=heads, drop_path=dpr, gaug=locat_on, prr=locat_on)
  base.update(overrides)
  return SwinConfig.from_dict(base)


# -- static geometry (NumPy, per trace) -----------------------------------------------------------
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
  """(N, N) row of the (2wh - 1)(2ww - 1) table for each (query, key) pair of a window, N = wh * ww."""
  wh, ww = window
  rows, cols = np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  d_row = rows[:, None] - rows[None, :] + wh - 1
  d_col = cols[:, None] - cols[None, :] + ww - 1
  return d_row * (2 * ww - 1) + d_col


def shift_mask(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
  """(nW, N, N): 0 between tokens of the same region of the rolled, padded map, SHIFT_MASK otherwise.

  The regions are cut from the padded grid's end, as timm's dynamic mask does (at the built size there
  is no padding and this is timm's static buffer).
  """
  regions = np.zeros(padded, np.int32)
  label = 0
  for rs in _region_slices(window[0], shift[0]):
    for cs in _region_slices(window[1], shift[1]):
      regions[rs, cs] = label
      label += 1
  wins = _partition(regions[None, :, :, None], window)[..., 0].reshape(-1, window[0] * window[1])
  return np.where(wins[:, :, None] == wins[:, None, :], 0.0, SHIFT_MASK).astype(np.float32)


def _region_slices(window: int, shift: int):
  """timm's three bands per axis. With shift 0 (an axis that does not shift while the other does) the
  second is empty and the third is the whole axis, as Python's slices make them in timm too."""
  return (slice(0, -window), slice(-window, -shift), slice(-shift, None))


def _partition(x, window):
  """(B, H, W, C) -> (B, nW, wh * ww, C), windows in row-major order; H, W multiples of the window."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def _unpartition(x, window, padded):
  """(B, nW, wh * ww, C) -> (B, H, W, C)."""
  b, _, _, c = x.shape
  (wh, ww), (h, w) = window, padded
  x = x.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def _pad_to(x, multiple: tuple[int, int]):
  """Zero-pads the bottom and right of (B, H, W, C) to multiples of `multiple`."""
  h, w = x.shape[1:3]
  pad_h, pad_w = -h % multiple[0], -w % multiple[1]
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return x


def _layer_norm(width, rngs):
  return nnx.LayerNorm(width, epsilon=LN_EPS, rngs=rngs)


def _linear(i, o, dtype, rngs, use_bias=True):
  return vit.Linear(i, o, use_bias=use_bias, kernel_init=init.TRUNC_NORMAL, bias_init=init.ZEROS,
                    dtype=dtype, rngs=rngs)


# -- modules -----------------------------------------------------------------------------------------
class WindowAttention(nnx.Module):
  """Multi-head attention inside windows with a learned relative position bias, GAug when cfg.gaug."""

  def __init__(self, cfg: SwinConfig, dim: int, num_heads: int, window: tuple[int, int], rngs: nnx.Rngs):
    dtype = vit.DTYPES[cfg.dtype]
    self.num_heads = num_heads
    self.window = window
    self.gaug_impl = cfg.gaug_impl
    self.qkv = _linear(dim, 3 * dim, dtype, rngs)
    self.proj = _linear(dim, dim, dtype, rngs)
    table = ((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
    self.relative_position_bias_table = nnx.Param(init.TRUNC_NORMAL(rngs.params(), table))
    self.geometry = locat.GAugGeometry(window)
    self.gaug = locat.GAug(dim // num_heads, self.geometry, rngs=rngs) if cfg.gaug else None
    # Set by the trainer (model.set_attributes(collect_stats=True)) to sow mean GAug var/alpha.
    self.collect_stats = False

  def relative_position_bias(self) -> jax.Array:
    """(H, N, N) float32."""
    idx = relative_position_index(self.window)
    return jnp.transpose(self.relative_position_bias_table[...][idx], (2, 0, 1))

  def __call__(self, windows: jax.Array, mask: np.ndarray | None) -> jax.Array:
    """windows (B, nW, N, C) -> (B, nW, N, C); mask (nW, N, N) or None (unshifted blocks)."""
    b, nw, n, c = windows.shape
    h, d = self.num_heads, c // self.num_heads
    qkv = self.qkv(windows).reshape(b, nw, n, 3, h, d).transpose(3, 0, 1, 4, 2, 5)  # 3 x (B, nW, H, N, d)
    rel = self.relative_position_bias()
    if mask is None:  # windows are independent examples; the bias (1, H, N, N) broadcasts over them
      q, k, v = (x.reshape(b * nw, h, n, d) for x in qkv)
      bias = rel[None]
    else:  # windows x heads as the heads' axis, so that the bias (1, nW * H, N, N) covers the mask too
      q, k, v = (x.reshape(b, nw * h, n, d) for x in qkv)
      bias = (jnp.asarray(mask)[:, None] + rel[None]).reshape(1, nw * h, n, n)
    if self.gaug is None:
      o = attention.plain_attention(q * d ** -0.5, k, v, bias)
    else:
      # GAug reads the unscaled queries from the input and the q projection, per window (B * nW, H, ...),
      # laid out as q is.
      var, alpha = self.gaug(windows.reshape(b * nw, n, c), self.qkv.kernel[...][:, :c], self.qkv.bias[...][:c],
                             h, self.window)
      var, alpha = var.reshape(q.shape[:2] + var.shape[2:]), alpha.reshape(q.shape[:2] + alpha.shape[2:])
      if self.collect_stats:
        self.sow(nnx.Intermediate, 'gaug_var', jnp.mean(var))
        self.sow(nnx.Intermediate, 'gaug_alpha', jnp.mean(alpha))
      o = attention.gaug_attention(q * d ** -0.5, k, v, var, alpha, grid=self.window, geometry=self.geometry,
                                   num_prefix=0, impl=self.gaug_impl, bias=bias)
    o = o.reshape(b, nw, h, n, d).transpose(0, 1, 3, 2, 4).reshape(b, nw, n, c)
    return self.proj(o)


class Block(nnx.Module):
  """Pre-norm Swin block: (shifted) window attention, then the MLP, each with drop path."""

  def __init__(self, cfg: SwinConfig, stage: int, index: int, drop_path: float, rngs: nnx.Rngs,
               drop_rngs: nnx.Rngs):
    dim = cfg.stage_dims[stage]
    self.window, self.shift = cfg.window_and_shift(stage, shifted=index % 2 == 1)
    self.norm1 = _layer_norm(dim, rngs)
    self.attn = WindowAttention(cfg, dim, cfg.num_heads[stage], self.window, rngs)
    self.norm2 = _layer_norm(dim, rngs)
    self.mlp = vit.Mlp(dim, int(dim * cfg.mlp_ratio), vit.DTYPES[cfg.dtype], rngs)
    # A mask broadcast over (H, W, C) is timm's per-sample DropPath.
    self.drop_path1 = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=drop_rngs)
    self.drop_path2 = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=drop_rngs)

  def _window_attention(self, x):
    h, w = x.shape[1:3]
    shifted = any(self.shift)
    if shifted:
      x = jnp.roll(x, (-self.shift[0], -self.shift[1]), axis=(1, 2))
    x = _pad_to(x, self.window)  # after the shift, as timm pads
    padded = x.shape[1:3]
    mask = shift_mask(padded, self.window, self.shift) if shifted else None
    x = _unpartition(self.attn(_partition(x, self.window), mask), self.window, padded)[:, :h, :w]
    if shifted:
      x = jnp.roll(x, self.shift, axis=(1, 2))
    return x

  def __call__(self, x):
    x = x + self.drop_path1(self._window_attention(self.norm1(x)).astype(x.dtype))
    return x + self.drop_path2(self.mlp(self.norm2(x)).astype(x.dtype))


class PatchMerging(nnx.Module):
  """2 x 2 neighbours concatenated (timm's order: (0,0), (1,0), (0,1), (1,1) as (row, col) offsets),
  normed, mapped to 2C without bias; odd sides are zero-padded first."""

  def __init__(self, dim: int, out_dim: int, dtype, rngs: nnx.Rngs):
    self.norm = _layer_norm(4 * dim, rngs)
    self.reduction = _linear(4 * dim, out_dim, dtype, rngs, use_bias=False)

  def __call__(self, x):
    x = _pad_to(x, (2, 2))
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
    return self.reduction(self.norm(x))


class Stage(nnx.Module):

  def __init__(self, cfg: SwinConfig, stage: int, rates: Sequence[float], rngs: nnx.Rngs, drop_rngs: nnx.Rngs):
    dtype = vit.DTYPES[cfg.dtype]
    self.downsample = (PatchMerging(cfg.stage_dims[stage - 1], cfg.stage_dims[stage], dtype, rngs)
                       if stage > 0 else None)
    self.blocks = nnx.List([Block(cfg, stage, j, r, rngs, drop_rngs) for j, r in enumerate(rates)])


class PatchEmbed(nnx.Module):
  """p x p patches -> embed_dim (conv), then LayerNorm; the image is zero-padded to whole patches."""

  def __init__(self, cfg: SwinConfig, rngs: nnx.Rngs):
    p, c = cfg.patch_size, cfg.embed_dim
    self.proj = vit.PatchConv(c, p, vit.DTYPES[cfg.dtype], rngs)
    self.norm = _layer_norm(c, rngs)
    self.patch_size = p

  def __call__(self, images):
    return self.norm(self.proj(_pad_to(images, (self.patch_size,) * 2)).astype(jnp.float32))


class SwinTransformer(nnx.Module):
  """Swin / LocAt Swin. `model(images)` -> logits; `model.features(images)` -> (B, H/32, W/32, C)."""

  def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.patch_embed = PatchEmbed(cfg, rngs)
    rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # torch.linspace
    starts = np.cumsum((0,) + cfg.depths)
    # A stream tagged 'dropout' even when the caller passed only a seed (as vit.ViT).
    drop_rngs = nnx.Rngs(dropout=rngs['dropout']())
    self.layers = nnx.List([Stage(cfg, i, rates[starts[i]:starts[i + 1]], rngs, drop_rngs)
                            for i in range(len(cfg.depths))])
    self.norm = _layer_norm(cfg.feature_dim, rngs)
    self.head = (nnx.Linear(cfg.feature_dim, cfg.num_classes, kernel_init=init.TRUNC_NORMAL,
                            bias_init=init.ZEROS, rngs=rngs) if cfg.num_classes else None)

  def encode(self, images: jax.Array, stages: Sequence[int] = ()):
    """Runs every stage. Returns the last stage's map (B, h, w, C) and the maps after `stages`."""
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
      raise ValueError(f'images of shape {images.shape}; expected (batch, height, width, 3) NHWC')
    x = self.patch_embed(images)
    taps = []
    for i, stage in enumerate(self.layers):
      if stage.downsample is not None:
        x = stage.downsample(x).astype(jnp.float32)
      for blk in stage.blocks:
        if self.cfg.remat == 'none':
          x = blk(x)
        else:
          x = nnx.remat(lambda m, y: m(y), policy=vit.REMAT_POLICIES[self.cfg.remat])(blk, x)
      if i in stages:
        taps.append(x)
    return x, taps

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.pooled_features(images)
    return self.head(x) if self.head is not None else x

  def pooled_features(self, images: jax.Array) -> jax.Array:
    """What the head reads: (B, C), the mean over the last stage after the final norm and PRR."""
    x, _ = self.encode(images)
    x = self.norm(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.cfg.prr:
      x = locat.prr(x, self.cfg.num_heads[-1])
    return jnp.mean(x, axis=1)

  def features(self, images: jax.Array, layers: Sequence[int] | None = None):
    """Dense features: the last stage's output before the final norm, (B, H/32, W/32, C) for Swin-T.

    With `layers` (stage indices, negative allowed), a list of those stages' outputs (strides
    cfg.stage_stride(i): 4, 8, 16, 32), as the authors' segmentation backbone takes them.
    """
    if layers is None:
      return self.encode(images)[0]
    num_stages = len(self.cfg.depths)
    if not layers or any(not -num_stages <= i < num_stages for i in layers):
      raise ValueError(f'layers {list(layers)}; expected stage indices in -{num_stages}..{num_stages - 1} '
                       f'(the model has {num_stages} stages)')
    idx = [i % num_stages for i in layers]
    tapped = tuple(sorted(set(idx)))
    _, taps = self.encode(images, stages=tapped)
    by_stage = dict(zip(tapped, taps))
    return [by_stage[i] for i in idx]


# The registry's handles on this family (models/registry.py).
Config = SwinConfig
Model = SwinTransformer
