"""GAug flash attention as Pallas kernels: GPU (Triton), or any backend in Pallas' interpreter.

The algorithm and its tile math are those of `blockwise` (attention.tile_forward and
tile_grads); here one kernel instance owns one (batch, head, block) and loops over the
other axis's blocks, so S never leaves the tile it is computed in.
* forward: one instance per query block; online softmax over key blocks; writes the output rows
  and their log-sum-exp, the only residual besides the inputs.
* backward, in Pallas as well, FlashAttention-2 style without atomics: one kernel per query block
  accumulates dq and the gradients of the per-query GAug coefficients over key blocks, one per key
  block accumulates dk and dv over query blocks. Both recompute their tiles from the log-sum-exp.
Each kernel is a `custom_partitioning` op: on a mesh, XLA splits it over its operands' batch and
head axes (as the data/fsdp and tensor axes shard them) and runs it per device on the local blocks;
it never splits the token or feature axes, whose whole rows each tile reads. Without that rule a
pallas_call is opaque to the partitioner, which would gather every input onto every device.
On GPU, block sizes must be powers of two >= 16 (Triton's tiles and dots). There is no TPU (Mosaic)
version: Mosaic wants the per-query vectors in (8, 128)-aligned 2-D blocks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as pltriton
from jax.sharding import NamedSharding, PartitionSpec as P

from locatvit_jax.models import attention

# (queries, keys) per tile: the fastest of five shapes on an H200, bf16, 1025 and 4097 tokens
# (benchmarks/README.md, "On a GPU").
DEFAULT_BLOCKS = (64, 64)
# The kernels are written for Triton; without these, JAX would lower them with Mosaic GPU.
TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)


def gaug_attention(q, k, v, var, alpha, *, grid, geometry, num_prefix, interpret=False, blocks=None):
  """attention.gaug_attention with the Pallas kernels (`interpret` runs them in the interpreter)."""
  blocks = blocks or DEFAULT_BLOCKS
  if not interpret and any(b < 16 or b & (b - 1) for b in blocks):
    raise ValueError(f'blocks={blocks}; the Triton kernels need powers of two >= 16')
  # Short sequences take one power-of-two block, of at least 16 rows for Triton's dots.
  blocks = tuple(min(b, max(16, pl.next_power_of_2(q.shape[2]))) for b in blocks)
  core = lambda *args: _flash(*args, interpret)
  return attention.tiled_gaug_attention(core, q, k, v, var, alpha, grid=grid, geometry=geometry,
                                        num_prefix=num_prefix, blocks=blocks)


# -- kernels ---------------------------------------------------------------------------------------
def _forward_kernel(q_ref, k_ref, v_ref, coef_row_ref, coef_col_ref, alpha_ref, o_ref, lse_ref, *,
                    layout, block_k):
  block_q, d = q_ref.shape
  q_idx = pl.program_id(2) * block_q + jnp.arange(block_q)
  q = q_ref[...]
  coefs = (coef_row_ref[...], coef_col_ref[...], alpha_ref[...])

  def key_step(j, carry):
    start = pl.multiple_of(j * block_k, block_k)
    keys = pl.ds(start, block_k)
    return attention.tile_forward(layout, carry, q, k_ref[keys, :], v_ref[keys, :], q_idx,
                                  start + jnp.arange(block_k), *coefs)

  init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, key_step, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, coef_row_ref, coef_col_ref, alpha_ref,
               dq_ref, d_coef_row_ref, d_coef_col_ref, d_alpha_ref, *, layout, block_k):
  block_q, d = q_ref.shape
  q_idx = pl.program_id(2) * block_q + jnp.arange(block_q)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  coefs = (coef_row_ref[...], coef_col_ref[...], alpha_ref[...])

  def key_step(j, carry):
    dq, d_coefs = carry
    start = pl.multiple_of(j * block_k, block_k)
    keys = pl.ds(start, block_k)
    k = k_ref[keys, :]
    _, ds, d_coefs_tile = attention.tile_grads(layout, q, k, v_ref[keys, :], do, lse, delta, q_idx,
                                               start + jnp.arange(block_k), *coefs)
    dq += jnp.einsum('qk,kd->qd', ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    return dq, tuple(a + b for a, b in zip(d_coefs, d_coefs_tile))

  zeros = jnp.zeros((block_q,), jnp.float32)
  dq, d_coefs = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, key_step,
                                  (jnp.zeros((block_q, d), jnp.float32), (zeros, zeros, zeros)))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  for ref, x in zip((d_coef_row_ref, d_coef_col_ref, d_alpha_ref), d_coefs):
    ref[...] = x


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, coef_row_ref, coef_col_ref, alpha_ref,
                dk_ref, dv_ref, *, layout, block_q):
  block_k, d = k_ref.shape
  k_idx = pl.program_id(2) * block_k + jnp.arange(block_k)
  k, v = k_ref[...], v_ref[...]

  def query_step(i, carry):
    dk, dv = carry
    start = pl.multiple_of(i * block_q, block_q)
    rows = pl.ds(start, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    # The per-query coefficient sums belong to _dq_kernel; unused here, the compiler drops them.
    p, ds, _ = attention.tile_grads(layout, q, k, v, do, lse_ref[rows], delta_ref[rows],
                                    start + jnp.arange(block_q), k_idx, coef_row_ref[rows],
                                    coef_col_ref[rows], alpha_ref[rows])
    dv += jnp.einsum('qk,qd->kd', p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk += jnp.einsum('qk,qd->kd', ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros((block_k, d), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, query_step, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# -- block specs over (B, H, N, d) and (B, H, N) arrays, grid (B, H, blocks) ------------------------
def _rows(block, d):
  return pl.BlockSpec((None, None, block, d), lambda b, h, i: (b, h, i, 0))


def _all_rows(n, d):
  return pl.BlockSpec((None, None, n, d), lambda b, h, i: (b, h, 0, 0))


def _per_row(block):
  return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def _per_all_rows(n):
  return pl.BlockSpec((None, None, n), lambda b, h, i: (b, h, 0))


# -- split over batch and heads on a mesh -----------------------------------------------------------
def _batch_and_heads_spec(sharding, shape, mesh) -> tuple:
  """The mesh axes of `sharding` on the first two axes (batch, heads), each kept only where it
  divides that axis."""
  spec = tuple(sharding.spec) + (None, None)
  axis_size = lambda axes: math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
  return tuple(axes if axes is None or shape[i] % axis_size(axes) == 0 else None
               for i, axes in enumerate(spec[:2]))


def _split_over_batch_and_heads(kernel_call, rule: str):
  """`kernel_call(layout, blocks, interpret, *arrays)` as an op that XLA partitions over the arrays'
  first two axes (batch, heads) and nowhere else. `rule`: the operands' and results' axes in
  custom_partitioning's einsum-like notation, b and h first; every other factor is replicated."""
  # In order of first appearance: Shardy numbers the factors so and wants these listed in that order.
  factors = list(dict.fromkeys(rule.replace(',', ' ').replace('->', ' ').split()))
  replicated = tuple(f for f in factors if f not in ('b', 'h'))

  def shardings(mesh, arg_shapes, result_shape):
    lead = _batch_and_heads_spec(arg_shapes[0].sharding, arg_shapes[0].shape, mesh)
    shard = lambda x: NamedSharding(mesh, P(*lead, *(None,) * (len(x.shape) - 2)))
    return jax.tree.map(shard, result_shape), tuple(map(shard, arg_shapes))

  def partition(layout, blocks, interpret, mesh, arg_shapes, result_shape):
    result_shardings, arg_shardings = shardings(mesh, arg_shapes, result_shape)
    local = functools.partial(kernel_call, layout, blocks, interpret)
    return mesh, local, result_shardings, arg_shardings

  def infer(layout, blocks, interpret, mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes, result_shape)[0]

  op = custom_partitioning(kernel_call, static_argnums=(0, 1, 2))
  op.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                   need_replication_factors=replicated)
  return op


def _forward_call(layout, blocks, interpret, q, k, v, coef_row, coef_col, alpha):
  block_q, block_k = blocks
  b, h, n_q, d = q.shape
  n_k = k.shape[2]
  return pl.pallas_call(
      functools.partial(_forward_kernel, layout=layout, block_k=block_k),
      grid=(b, h, n_q // block_q),
      in_specs=[_rows(block_q, d), _all_rows(n_k, d), _all_rows(n_k, d)] + [_per_row(block_q)] * 3,
      out_specs=[_rows(block_q, d), _per_row(block_q)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((b, h, n_q), jnp.float32)],
      interpret=interpret,
      compiler_params=TRITON,
      name='gaug_flash_forward',
  )(q, k, v, coef_row, coef_col, alpha)


def _dq_call(layout, blocks, interpret, q, k, v, do, lse, delta, coef_row, coef_col, alpha):
  block_q, block_k = blocks
  b, h, n_q, d = q.shape
  n_k = k.shape[2]
  per_query_shape = jax.ShapeDtypeStruct((b, h, n_q), jnp.float32)
  return pl.pallas_call(
      functools.partial(_dq_kernel, layout=layout, block_k=block_k),
      grid=(b, h, n_q // block_q),
      in_specs=[_rows(block_q, d), _all_rows(n_k, d), _all_rows(n_k, d), _rows(block_q, d)]
      + [_per_row(block_q)] * 5,
      out_specs=[_rows(block_q, d)] + [_per_row(block_q)] * 3,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [per_query_shape] * 3,
      interpret=interpret,
      compiler_params=TRITON,
      name='gaug_flash_backward_dq',
  )(q, k, v, do, lse, delta, coef_row, coef_col, alpha)


def _dkv_call(layout, blocks, interpret, q, k, v, do, lse, delta, coef_row, coef_col, alpha):
  block_q, block_k = blocks
  b, h, n_q, d = q.shape
  n_k = k.shape[2]
  return pl.pallas_call(
      functools.partial(_dkv_kernel, layout=layout, block_q=block_q),
      grid=(b, h, n_k // block_k),
      in_specs=[_all_rows(n_q, d), _rows(block_k, d), _rows(block_k, d), _all_rows(n_q, d)]
      + [_per_all_rows(n_q)] * 5,
      out_specs=[_rows(block_k, d), _rows(block_k, d)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=interpret,
      compiler_params=TRITON,
      name='gaug_flash_backward_dkv',
  )(q, k, v, do, lse, delta, coef_row, coef_col, alpha)


# q: query tokens, k: key tokens, d: head features.
_BACKWARD_OPERANDS = 'b h q d, b h k d, b h k d, b h q d, b h q, b h q, b h q, b h q, b h q'
_forward = _split_over_batch_and_heads(
    _forward_call, 'b h q d, b h k d, b h k d, b h q, b h q, b h q -> b h q d, b h q')
_backward_dq = _split_over_batch_and_heads(_dq_call, f'{_BACKWARD_OPERANDS} -> b h q d, b h q, b h q, b h q')
_backward_dkv = _split_over_batch_and_heads(_dkv_call, f'{_BACKWARD_OPERANDS} -> b h k d, b h k d')


# -- custom VJP ------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, coef_row, coef_col, alpha, layout, blocks, interpret):
  return _flash_fwd(q, k, v, coef_row, coef_col, alpha, layout, blocks, interpret)[0]


def _flash_fwd(q, k, v, coef_row, coef_col, alpha, layout, blocks, interpret):
  o, lse = _forward(layout, blocks, interpret, q, k, v, coef_row, coef_col, alpha)
  return o, (q, k, v, coef_row, coef_col, alpha, o, lse)


def _flash_bwd(layout, blocks, interpret, res, do):
  q, k, v, coef_row, coef_col, alpha, o, lse = res
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  args = (q, k, v, do, lse, delta, coef_row, coef_col, alpha)
  dq, d_coef_row, d_coef_col, d_alpha = _backward_dq(layout, blocks, interpret, *args)
  dk, dv = _backward_dkv(layout, blocks, interpret, *args)
  return dq, dk, dv, d_coef_row, d_coef_col, d_alpha


_flash.defvjp(_flash_fwd, _flash_bwd)
