"""LocAt: the two add-ons of LocAtViT (spec sections 2 and 3).

* GAug: a learned per-query 2-D Gaussian bias on the attention logits of every block.
* PRR: a parameter-free self-attention over the final tokens before the classifier.

GAug is computed in float32 whatever the compute dtype. The bias is separable per query,
    S[i, j] = alpha_i * g_row_i(r_j) * g_col_i(c_j),
so every attention implementation here works from the per-query `(var, alpha)` and the patch
grid, never from a (N, N, 2) distance tensor. `dense_bias` materialises S for reference and
tests; the attention kernels in `attention.py` build it on the fly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from locatvit_jax.models import init


@dataclasses.dataclass(frozen=True)
class GAugGeometry:
  """Constants of the Gaussian kernel, fixed by the grid the model was built for."""

  grid0: tuple[int, int]  # (h0, w0): the training patch grid.

  @property
  def side(self) -> int:
    return max(self.grid0)

  @property
  def var_max(self) -> float:
    """c in `var = c * sigmoid(z - ln(c - 1))`."""
    return float(self.side ** 2)

  @property
  def var_shift(self) -> float:
    """ln(c - 1): makes var = 1 patch^2 when the linear output is 0 (0 when c <= 2)."""
    c = self.var_max
    return math.log(c - 1.0) if c > 2 else 0.0

  @property
  def dist_max(self) -> float:
    """Per-axis clamp of squared distances: far tokens at larger grids see the kernel's floor."""
    return float((self.side - 1) ** 2)

  @property
  def eps(self) -> float:
    """0.1 * 2^k, smallest k >= 0 with 0.5 * dist_max / eps^2 <= 32500 (keeps fp16 finite)."""
    k = 0
    while 0.5 * self.dist_max / (0.1 * 2 ** k) ** 2 > 32500:
      k += 1
    return 0.1 * 2 ** k

  def var_scale(self, grid: tuple[int, int]) -> float:
    """Variances grow with the shorter side when the grid differs from the training one."""
    if tuple(grid) == tuple(self.grid0):
      return 1.0
    return min(grid) / min(self.grid0)


class GAug(nnx.Module):
  """Predicts per-query variance (2 axes) and strength from the patch queries.

  Both maps are shared by all heads of a block: 3 * head_dim + 3 parameters.
  """

  def __init__(self, head_dim: int, geometry: GAugGeometry, *, rngs: nnx.Rngs):
    self.geometry = geometry
    linear = lambda out: nnx.Linear(
        head_dim, out, kernel_init=init.TRUNC_NORMAL, bias_init=init.ZEROS,
        dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.var_proj = linear(2)
    self.alpha_proj = linear(1)

  def __call__(self, x: jax.Array, q_kernel: jax.Array, q_bias: jax.Array, num_heads: int,
               grid: tuple[int, int], num_prefix: int = 0):
    """var (B, H, hw, 2) and alpha (B, H, hw) of the patch queries q = x q_kernel + q_bias (unscaled,
    before any rotation), from the attention's input x (B, N, C), the first num_prefix tokens not
    patches, and the query part of its projection: q_kernel (C, H * d), q_bias (H * d,), heads in order.

    The maps are folded into the query projection: x (W_q K) + (b_q K + b), one float32 matmul of
    the input with C x 3H composed weights, instead of (x W_q) K over every head's queries. That
    measured 2-3 % of LocAtViT-Ti's CPU train step at 224 and 512 px (benchmarks/README.md), and it
    does not depend on the dtype the queries are computed in. Every token's row is computed and the
    prefix rows of the small result dropped: slicing the patches out of x first would copy it."""
    kernel = jnp.concatenate([self.var_proj.kernel[...], self.alpha_proj.kernel[...]], axis=1)  # (d, 3)
    bias = jnp.concatenate([self.var_proj.bias[...], self.alpha_proj.bias[...]])
    b, n, c = x.shape
    per_head = lambda w: w.astype(jnp.float32).reshape(*w.shape[:-1], num_heads, -1)  # (..., H, d)
    folded_kernel = jnp.einsum('chd,dk->chk', per_head(q_kernel), kernel).reshape(c, 3 * num_heads)
    folded_bias = (per_head(q_bias) @ kernel + bias).reshape(3 * num_heads)
    # Over rows, for the kernel gradient's sake (vit.Linear).
    out = x.astype(jnp.float32).reshape(-1, c) @ folded_kernel + folded_bias
    out = out.reshape(b, n, num_heads, 3)[:, num_prefix:].transpose(0, 2, 1, 3)
    g = self.geometry
    var = g.var_max * jax.nn.sigmoid(out[..., :2] - g.var_shift) * g.var_scale(grid)
    return var, jax.nn.softplus(out[..., 2])


def axis_distances(grid: tuple[int, int], geometry: GAugGeometry):
  """Clamped squared distances of every patch query to each grid row and column: d_row (hw, h),
  d_col (hw, w), queries in row-major patch order."""
  h, w = grid
  rows = jnp.arange(h, dtype=jnp.float32)
  cols = jnp.arange(w, dtype=jnp.float32)
  q_row = jnp.repeat(rows, w)  # row of query i
  q_col = jnp.tile(cols, h)
  d_row = jnp.minimum((q_row[:, None] - rows[None, :]) ** 2, geometry.dist_max)
  d_col = jnp.minimum((q_col[:, None] - cols[None, :]) ** 2, geometry.dist_max)
  return d_row, d_col


def axis_gaussians(var: jax.Array, grid: tuple[int, int], geometry: GAugGeometry):
  """The two 1-D Gaussians of every query on its own row and column axes.

  Returns g_row (B, H, hw, h) and g_col (B, H, hw, w) such that the kernel between query i and
  patch (r, c) is g_row[i, r] * g_col[i, c].
  """
  d_row, d_col = axis_distances(grid, geometry)
  denom = var + geometry.eps  # (B, H, hw, 2)
  return _gaussian(d_row, denom[..., 0:1]), _gaussian(d_col, denom[..., 1:2])


def _gaussian(sq_dist, denom):
  """The kernel exp(-d / (2 (var + eps))) of squared distances d, denom = var + eps."""
  return jnp.exp(-0.5 * sq_dist / denom)


def patch_bias(var, alpha, grid, geometry):
  """S over patch pairs only: (B, H, hw, hw), float32.

  The row factor alpha_i g_row_i(r) is formed per query and grid row. The column factor is an
  expression of its own, not `axis_gaussians`' array: that array is shared with the backward, so
  XLA:CPU computes it once and, before the fused exp that consumes S, writes its broadcast over the
  grid rows (a middle axis) out as a full (hw, hw) array. Written here, it is evaluated inside that
  fusion: LocAtViT-Ti's train step 2.1 % faster at 512 px, 0.7 % at 224 (benchmarks/README.md)."""
  h, w = grid
  d_row, d_col = axis_distances(grid, geometry)
  denom = var + geometry.eps  # (B, H, hw, 2)
  row = alpha[..., None] * _gaussian(d_row, denom[..., 0:1])  # (B, H, hw, h)
  col = _gaussian(d_col[:, None, :], denom[..., 1:2, None])  # (B, H, hw, 1, w)
  return (row[..., :, None] * col).reshape(*var.shape[:3], h * w)


def patch_bias_vjp(ds, var, alpha, grid, geometry):
  """(dvar, dalpha): the gradient of `patch_bias` for its cotangent ds (B, H, hw, hw).

  With k_ij = g_row_i(r_j) g_col_i(c_j) the kernel between query i and patch j = (r_j, c_j),
  dS_ij/dalpha_i = k_ij and dS_ij/dvar_i = alpha_i k_ij (d_row_i(r_j), d_col_i(c_j)) / (2 (var_i + eps)^2):
  per query, three sums of ds_ij k_ij over the patches, weighted by 1, d_row and d_col. ds k is
  formed once through a (h, w) view of the key axis and reduced over both axes. This measured 3x
  faster at 224 px and 1.4x at 512 (the gradient alone) than summing over the columns and then the
  rows, whose two reductions have different shapes and need the column factor broadcast into the
  middle axis, materialised (benchmarks/README.md).
  """
  h, w = grid
  d_row, d_col = axis_distances(grid, geometry)
  g_row, g_col = axis_gaussians(var, grid, geometry)
  dsk = ds.reshape(ds.shape[:3] + (h, w)) * g_row[..., :, None] * g_col[..., None, :]
  total = lambda x: jnp.sum(x, axis=(-2, -1))
  dalpha = total(dsk)
  weighted = jnp.stack([total(dsk * d_row[:, :, None]), total(dsk * d_col[:, None, :])], axis=-1)
  return alpha[..., None] * weighted * (0.5 / (var + geometry.eps) ** 2), dalpha


def dense_bias(var, alpha, grid, geometry, num_prefix: int):
  """S over all tokens (B, H, N, N): zero in every prefix row and column."""
  s = patch_bias(var, alpha, grid, geometry)
  pad = ((0, 0), (0, 0), (num_prefix, 0), (num_prefix, 0))
  return jnp.pad(s, pad)


def prr(x: jax.Array, num_heads: int, num_queries: int | None = None) -> jax.Array:
  """Patch representation refinement: softmax(x x^T / sqrt(C/H)) x per head, q = k = v = x.

  `num_queries`: refine only the first num_queries tokens, (B, num_queries, C). Each row of the
  result depends on its own query alone, so a head that reads only the class tokens needs only
  their rows: O(N) instead of O(N^2) work, the same values."""
  b, n, c = x.shape
  xh = x.reshape(b, n, num_heads, c // num_heads)
  qh = xh if num_queries is None else xh[:, :num_queries]
  logits = jnp.einsum('bqhd,bkhd->bhqk', qh, xh).astype(jnp.float32)
  p = jax.nn.softmax(logits / math.sqrt(c // num_heads), axis=-1).astype(x.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', p, xh).reshape(b, qh.shape[1], c)
