"""Multi-head attention cores, with or without the GAug bias.

All take q, k, v as (B, H, N, d), the queries already scaled, and return (B, H, N, d). Logits and
softmax are float32; the matmuls take the inputs' dtype. All take an optional extra additive logits
`bias` of shape (B or 1, H or 1, N, N), float32 and finite (Swin's relative position bias plus its
shifted-window mask), and return its gradient summed to that shape. Masks are large finite negatives
(Swin's -100, or MASKED), never -inf: a row masked everywhere must not become inf - inf.

Implementations of GAug attention (`gaug_impl` in the model config); all compute the same function
to float32 rounding (tests/test_attention.py):
* `dense`: materialises S (B, H, N, N), adds it to the logits, plain autodiff. The reference, and
  what a model's attention runs when asked to expose its probabilities (vit.Attention.sow_attention).
* `fused`: one custom VJP around the whole attention. S is built from the two per-query 1-D
  Gaussians inside the exp, and the softmax subtracts the bound `max_j z_ij + alpha_i`, z = logits
  + bias (>= the row max, since 0 <= S_ij <= alpha_i), so S is evaluated once. The bound takes the
  maximum after the bias: a masked key's large logit must not set it, or every term would underflow.
  The backward keeps one (B, H, N, N) residual, the unnormalised exp. Exact while alpha_i < 87 (the
  row's largest term is at least exp(-alpha_i) and must not underflow); softplus keeps alpha far
  below that. Without S it is also `plain_attention`, the core of every model without GAug.
* `blockwise`: flash attention in pure JAX: query blocks in a loop, key blocks in an inner scan
  with an online softmax (same bound), each tile's S computed from the per-query coefficients and
  the tile's token indices. The backward recomputes the tiles from the output's log-sum-exp, so
  memory is O(N) per head.
  An extra bias is sliced per tile (its gradient is accumulated per tile, so memory is O(N^2) then,
  as the bias is).
* `pallas`: the same tiles as Pallas kernels, forward and backward (attention_pallas.py), for GPU;
  on a mesh XLA splits them over batch and heads.
  `pallas_interpret` runs those kernels in Pallas' interpreter (CPU, tests). They take no extra bias:
  both raise ValueError('... takes no extra logits bias ...'); use `fused` or `blockwise` there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from locatvit_jax.models import locat

GAUG_IMPLS = ('dense', 'fused', 'blockwise', 'pallas', 'pallas_interpret')

# Largest tiles (queries, keys) of `blockwise`, for CPU. A single key tile (up to 8192 tokens) lets
# XLA fuse softmax and matmuls (YNNPACK); tiling the keys costs ~40% more. 512-query tiles keep memory
# linear in N. 4097 tokens, forward + backward: 0.8 GB of temporaries and +4-27% time against 4.7 GB
# for `fused`; 512-key tiles took 0.2 GB and +37% when first measured (benchmarks/README.md).
BLOCKWISE_BLOCKS = (512, 8192)
# Finite, so that exp(MASKED - m) is 0 without inf - inf anywhere.
MASKED = -0.7 * float(np.finfo(np.float32).max)


def probabilities(q, k, bias=None):
  """softmax(q k^T + bias) over the keys: (B, H, N, N) float32. `bias` (B, H, N, N) or None."""
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
  return jax.nn.softmax(logits if bias is None else logits + bias, axis=-1)


def attend(p, v):
  """The values mixed by the probabilities p (B, H, N, N), in v's dtype."""
  return jnp.einsum('bhqk,bhkd->bhqd', p.astype(v.dtype), v)


def plain_attention(q, k, v, bias=None):
  """softmax(q k^T + bias) v; `bias` as in the module docstring, or None.

  The `fused` core without S: its VJP normalises (N, d) arrays instead of the (N, N) probabilities
  and keeps one (N, N) residual, which autodiff of softmax does not (benchmarks/README.md)."""
  bias_axes = None
  if bias is not None:
    bias = check_bias(bias, q)
    bias_axes = broadcast_axes(bias, q)
  return _fused_attention(q, k, v, None, None, bias, None, None, 0, bias_axes)


def check_bias(bias, q):
  """The extra logits bias as float32, after checking that it broadcasts to q's (B, H, N, N)."""
  b, h, n = q.shape[:3]
  if bias.ndim != 4 or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, h) or bias.shape[2:] != (n, n):
    raise ValueError(f'bias of shape {bias.shape}; expected ({b} or 1, {h} or 1, {n}, {n}) for queries '
                     f'of shape {q.shape}')
  return bias.astype(jnp.float32)


def broadcast_axes(bias, q) -> tuple[int, ...]:
  """The axes (of 0, 1) over which `bias` broadcasts to q's batch and heads: its gradient's sums."""
  return tuple(i for i in (0, 1) if bias.shape[i] == 1 and q.shape[i] != 1)


def gaug_attention(q, k, v, var, alpha, *, grid, geometry, num_prefix, impl, blocks=None, bias=None):
  """Attention with the GAug bias S (spec section 2) and the optional extra `bias` added to the logits.

  var (B, H, hw, 2) and alpha (B, H, hw) belong to the patch queries; N = num_prefix + h * w.
  `blocks`: the largest (query, key) tiles of `blockwise` and `pallas*` (default: theirs).
  `bias`: (B or 1, H or 1, N, N), e.g. Swin's relative position bias + shift mask (module docstring).
  """
  n, hw = q.shape[2], grid[0] * grid[1]
  if n != num_prefix + hw or var.shape[2] != hw:
    raise ValueError(f'{n} tokens and var of shape {var.shape}; expected {num_prefix} prefix tokens + '
                     f'{grid[0]}x{grid[1]} patches')
  if blocks is not None and (len(blocks) != 2 or min(blocks) <= 0):
    raise ValueError(f'blocks={blocks}; expected two positive tile sizes (queries, keys)')
  if bias is not None:
    bias = check_bias(bias, q)
  if impl == 'dense':
    s = locat.dense_bias(var, alpha, grid, geometry, num_prefix)
    return attend(probabilities(q, k, s if bias is None else bias + s), v)
  if impl == 'fused':
    bias_axes = None if bias is None else broadcast_axes(bias, q)
    return _fused_attention(q, k, v, var, alpha, bias, tuple(grid), geometry, num_prefix, bias_axes)
  if impl == 'blockwise':
    blocks = tuple(_balanced_block(n, b) for b in blocks or BLOCKWISE_BLOCKS)
    core = lambda *args, bias=None: _blockwise_attention(*args[:6], bias, *args[6:])
    return tiled_gaug_attention(core, q, k, v, var, alpha, grid=grid, geometry=geometry,
                                num_prefix=num_prefix, blocks=blocks, bias=bias)
  if impl in ('pallas', 'pallas_interpret'):
    if bias is not None:
      raise ValueError(f"gaug_impl={impl!r} takes no extra logits bias (got shape {bias.shape}); "
                       "use 'fused' or 'blockwise'")
    # Imported here so that the XLA paths never load Pallas and its Triton lowering.
    from locatvit_jax.models import attention_pallas
    return attention_pallas.gaug_attention(q, k, v, var, alpha, grid=grid, geometry=geometry,
                                           num_prefix=num_prefix, interpret=impl == 'pallas_interpret',
                                           blocks=blocks)
  raise ValueError(f'gaug_impl={impl!r}; expected one of {GAUG_IMPLS}')


def _balanced_block(n: int, block: int) -> int:
  """The smallest tile that covers n in as many tiles as `block` does: 1025 by 512 -> 342 (3 tiles),
  so that padding stays under one row per tile."""
  num_tiles = -(-n // block)
  return -(-n // num_tiles)


# -- fused -----------------------------------------------------------------------------------------
def _fused_exp(q, k, var, alpha, bias, grid, geometry, num_prefix):
  """exp(z + S - bound) and its row sums, z = logits (+ bias); S comes from the 1-D Gaussians in
  the same fusion."""
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  bound = jnp.max(logits, axis=-1)
  if var is None:  # plain attention
    e = jnp.exp(logits - bound[..., None])
  else:
    bound = bound + jnp.pad(alpha, ((0, 0), (0, 0), (num_prefix, 0)))
    e = jnp.exp(logits + locat.dense_bias(var, alpha, grid, geometry, num_prefix) - bound[..., None])
  return e, jnp.sum(e, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _fused_attention(q, k, v, var, alpha, bias, grid, geometry, num_prefix, bias_axes):
  """`bias_axes`: None without a bias, else the axes its gradient is summed over (broadcast_axes)."""
  return _fused_fwd(q, k, v, var, alpha, bias, grid, geometry, num_prefix, bias_axes)[0]


def _fused_fwd(q, k, v, var, alpha, bias, grid, geometry, num_prefix, bias_axes):
  e, l = _fused_exp(q, k, var, alpha, bias, grid, geometry, num_prefix)
  # Normalising the (N, d) output instead of the (N, N) probabilities saves a pass over N^2.
  o = jnp.einsum('bhqk,bhkd->bhqd', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = (o / l[..., None]).astype(v.dtype)
  return o, (q, k, v, var, alpha, e, l, o)


def _fused_bwd(grid, geometry, num_prefix, bias_axes, res, do):
  q, k, v, var, alpha, e, l, o = res
  # p = e / l folded into the (N, d) and (N,) operands, so no pass over N^2 normalises.
  do_l = do.astype(jnp.float32) / l[..., None]
  delta_l = jnp.sum(o.astype(jnp.float32) * do_l, axis=-1, keepdims=True)  # sum_j p_ij dp_ij / l_i
  dv = jnp.einsum('bhqk,bhqd->bhkd', e.astype(v.dtype), do_l.astype(v.dtype),
                  preferred_element_type=jnp.float32)
  dp_l = jnp.einsum('bhqd,bhkd->bhqk', do_l.astype(v.dtype), v, preferred_element_type=jnp.float32)
  dz = e * (dp_l - delta_l)  # d logits = d S = d bias
  dq = jnp.einsum('bhqk,bhkd->bhqd', dz.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum('bhqk,bhqd->bhkd', dz.astype(q.dtype), q, preferred_element_type=jnp.float32)
  dvar = dalpha = None
  if var is not None:
    dvar, dalpha = locat.patch_bias_vjp(dz[:, :, num_prefix:, num_prefix:], var, alpha, grid, geometry)
  dbias = None if bias_axes is None else jnp.sum(dz, axis=bias_axes, keepdims=True)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dvar, dalpha, dbias


_fused_attention.defvjp(_fused_fwd, _fused_bwd)


# -- tiles, shared by `blockwise` and the Pallas kernels -------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Static facts that place token indices on the patch grid: token t >= num_prefix is patch
  t - num_prefix in row-major order; tokens from num_tokens on are padding."""

  num_tokens: int
  num_prefix: int
  grid_width: int
  dist_max: float


def _patch_rows_cols(layout: TokenLayout, idx):
  """Grid row and column (float32) of token indices; arbitrary for prefix and padding tokens."""
  p = jnp.maximum(idx - layout.num_prefix, 0)  # non-negative, so truncating div/rem are floor ones
  w = layout.grid_width
  return jax.lax.div(p, w).astype(jnp.float32), jax.lax.rem(p, w).astype(jnp.float32)


def tile_scores(layout: TokenLayout, q, k, q_idx, k_idx, coef_row, coef_col, bias=None):
  """Logits of one tile and its GAug kernel.

  q (..., bq, d), k (..., bk, d); q_idx (bq,), k_idx (bk,) token indices (int32); coef_row,
  coef_col (..., bq) per query: 0.5 / (var + eps); `bias` the tile of the extra logits bias or None.
  Returns the logits with the bias (MASKED at padding keys), the kernel g with S = alpha * g (0 at
  prefix and padding keys) and the clamped squared distances.
  """
  logits = jnp.einsum('...qd,...kd->...qk', q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  logits = jnp.where((k_idx < layout.num_tokens)[None, :], logits, MASKED)
  q_row, q_col = _patch_rows_cols(layout, q_idx)
  k_row, k_col = _patch_rows_cols(layout, k_idx)
  d_row = jnp.minimum((q_row[:, None] - k_row[None, :]) ** 2, layout.dist_max)
  d_col = jnp.minimum((q_col[:, None] - k_col[None, :]) ** 2, layout.dist_max)
  g = jnp.exp(-(coef_row[..., None] * d_row + coef_col[..., None] * d_col))
  key_is_patch = (k_idx >= layout.num_prefix) & (k_idx < layout.num_tokens)
  g = jnp.where(key_is_patch[None, :], g, 0.0)
  return logits, g, d_row, d_col


def tile_forward(layout: TokenLayout, carry, q, k, v, q_idx, k_idx, coef_row, coef_col, alpha, bias=None):
  """Folds one tile into the online softmax state (acc (..., bq, d), max, sum); alpha (..., bq)
  is 0 for prefix and padding queries; `bias` the tile of the extra logits bias or None.

  The running max is taken over the bound max_j logits_ij + alpha_i >= max_j (logits_ij + S_ij)
  (logits with the bias), so S is evaluated once, inside the exp.
  """
  acc, m, l = carry
  logits, g, _, _ = tile_scores(layout, q, k, q_idx, k_idx, coef_row, coef_col, bias)
  m_new = jnp.maximum(m, jnp.max(logits, axis=-1) + alpha)
  correction = jnp.exp(m - m_new)
  p = jnp.exp(logits + alpha[..., None] * g - m_new[..., None])
  pv = jnp.einsum('...qk,...kd->...qd', p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return acc * correction[..., None] + pv, m_new, l * correction + jnp.sum(p, axis=-1)


def tile_grads(layout: TokenLayout, q, k, v, do, lse, delta, q_idx, k_idx, coef_row, coef_col, alpha,
               bias=None):
  """Recomputes one tile's probabilities p from the log-sum-exp and returns p, ds = d logits = d S
  (= d bias), and the tile's sums for d coef_row, d coef_col, d alpha (..., bq). delta_i = sum_d
  o_id do_id."""
  logits, g, d_row, d_col = tile_scores(layout, q, k, q_idx, k_idx, coef_row, coef_col, bias)
  p = jnp.exp(logits + alpha[..., None] * g - lse[..., None])
  dp = jnp.einsum('...qd,...kd->...qk', do, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta[..., None])
  dsg = ds * g  # dS/dalpha = g, dS/dcoef = -alpha * g * d
  d_coefs = (-alpha * jnp.sum(dsg * d_row, axis=-1), -alpha * jnp.sum(dsg * d_col, axis=-1),
             jnp.sum(dsg, axis=-1))
  return p, ds, d_coefs


def _round_up(n: int, b: int) -> int:
  return -(-n // b) * b


def tiled_gaug_attention(core, q, k, v, var, alpha, *, grid, geometry, num_prefix, blocks, bias=None):
  """Pads queries and keys to whole blocks, turns (var, alpha) into per-token coefficients and
  calls `core(q, k, v, coef_row, coef_col, alpha, layout, blocks)` on the padded arrays, with
  `bias=` the extra logits bias padded with zeros when there is one."""
  block_q, block_k = blocks
  n = q.shape[2]
  n_q, n_k = _round_up(n, block_q), _round_up(n, block_k)
  rows = lambda x, n_pad: jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - n), (0, 0)))
  coef = lambda x: jnp.pad(x, ((0, 0), (0, 0), (num_prefix, n_q - n)))  # prefix, padding: 0
  inv = 0.5 / (var + geometry.eps)
  layout = TokenLayout(n, num_prefix, grid[1], geometry.dist_max)
  args = (rows(q, n_q), rows(k, n_k), rows(v, n_k), coef(inv[..., 0]), coef(inv[..., 1]), coef(alpha),
          layout, (block_q, block_k))
  if bias is None:
    return core(*args)[:, :, :n]
  return core(*args, bias=jnp.pad(bias, ((0, 0), (0, 0), (0, n_q - n), (0, n_k - n))))[:, :, :n]


# -- blockwise -------------------------------------------------------------------------------------
def _block(x, start, size):
  """Rows [start, start + size) of axis 2 of (B, H, N, ...)."""
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)


def _bias_tile(bias, start_q, block_q, start_k, block_k):
  """The (query block, key block) tile of the padded extra bias, or None without one."""
  if bias is None:
    return None
  return jax.lax.dynamic_slice_in_dim(_block(bias, start_q, block_q), start_k, block_k, axis=3)


def _unblock(x):
  """(num_blocks, B, H, block, ...) -> (B, H, num_blocks * block, ...)."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _blockwise_attention(q, k, v, coef_row, coef_col, alpha, bias, layout, blocks):
  """`bias`: the padded extra logits bias (B or 1, H or 1, padded N_q, padded N_k) or None."""
  return _blockwise_fwd(q, k, v, coef_row, coef_col, alpha, bias, layout, blocks)[0]


def _blockwise_fwd(q, k, v, coef_row, coef_col, alpha, bias, layout, blocks):
  block_q, block_k = blocks
  b, h, _, d = q.shape

  def query_block(start_q):
    q_b = _block(q, start_q, block_q)
    coefs_b = [_block(c, start_q, block_q) for c in (coef_row, coef_col, alpha)]
    q_idx = start_q + jnp.arange(block_q)

    def key_step(carry, start_k):
      kv = [_block(x, start_k, block_k) for x in (k, v)]
      bias_b = _bias_tile(bias, start_q, block_q, start_k, block_k)
      return tile_forward(layout, carry, q_b, *kv, q_idx, start_k + jnp.arange(block_k), *coefs_b,
                          bias_b), None

    init = (jnp.zeros((b, h, block_q, d), jnp.float32), jnp.full((b, h, block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, block_q), jnp.float32))
    (acc, m, l), _ = jax.lax.scan(key_step, init, jnp.arange(0, k.shape[2], block_k))
    return (acc / l[..., None]).astype(v.dtype), m + jnp.log(l)

  o, lse = jax.lax.map(query_block, jnp.arange(0, q.shape[2], block_q))
  o, lse = _unblock(o), _unblock(lse)
  return o, (q, k, v, coef_row, coef_col, alpha, bias, o, lse)


def _blockwise_bwd(layout, blocks, res, do):
  """Key blocks outside, query blocks inside: dk, dv of a key block are carried, dq, the
  per-query GAug gradients and the bias' gradient (summed over its broadcast axes) are
  accumulated in place."""
  q, k, v, coef_row, coef_col, alpha, bias, o, lse = res
  block_q, block_k = blocks
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  f32_zeros = lambda x: jnp.zeros(x.shape, jnp.float32)

  def key_block(carry, start_k):
    k_b, v_b = _block(k, start_k, block_k), _block(v, start_k, block_k)
    k_idx = start_k + jnp.arange(block_k)

    def query_step(carry, start_q):
      dk_b, dv_b, dq, d_coefs, d_bias = carry
      q_b, do_b = _block(q, start_q, block_q), _block(do, start_q, block_q)
      per_query = [_block(x, start_q, block_q) for x in (lse, delta, coef_row, coef_col, alpha)]
      bias_b = _bias_tile(bias, start_q, block_q, start_k, block_k)
      p, ds, d_coefs_b = tile_grads(layout, q_b, k_b, v_b, do_b, *per_query[:2],
                                    start_q + jnp.arange(block_q), k_idx, *per_query[2:], bias_b)
      dv_b += jnp.einsum('bhqk,bhqd->bhkd', p.astype(do.dtype), do_b, preferred_element_type=jnp.float32)
      dk_b += jnp.einsum('bhqk,bhqd->bhkd', ds.astype(q.dtype), q_b, preferred_element_type=jnp.float32)
      dq_b = jnp.einsum('bhqk,bhkd->bhqd', ds.astype(k.dtype), k_b, preferred_element_type=jnp.float32)
      accumulate = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
          acc, _block(acc, start_q, block_q) + x, start_q, axis=2)
      d_coefs = tuple(accumulate(a, x) for a, x in zip(d_coefs, d_coefs_b))
      if d_bias is not None:  # this tile's rows and columns are written once
        ds_b = jnp.sum(ds, axis=broadcast_axes(bias, q), keepdims=True)
        d_bias = jax.lax.dynamic_update_slice(d_bias, ds_b, (0, 0, start_q, start_k))
      return (dk_b, dv_b, accumulate(dq, dq_b), d_coefs, d_bias), None

    zeros_b = jnp.zeros(k_b.shape, jnp.float32)
    (dk_b, dv_b, dq, d_coefs, d_bias), _ = jax.lax.scan(query_step, (zeros_b, zeros_b) + carry,
                                                        jnp.arange(0, q.shape[2], block_q))
    return (dq, d_coefs, d_bias), (dk_b, dv_b)

  init = (f32_zeros(q), (f32_zeros(coef_row), f32_zeros(coef_col), f32_zeros(alpha)),
          None if bias is None else f32_zeros(bias))
  (dq, d_coefs, d_bias), (dk, dv) = jax.lax.scan(key_block, init, jnp.arange(0, k.shape[2], block_k))
  return (dq.astype(q.dtype), _unblock(dk).astype(k.dtype), _unblock(dv).astype(v.dtype)) + d_coefs + (d_bias,)


_blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)
