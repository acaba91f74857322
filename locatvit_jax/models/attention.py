"""Multi-head attention cores, with or without the GAug bias.

All take q, k, v as (B, H, N, d), the queries already scaled, and return (B, H, N, d). Logits and
softmax are float32; the two matmuls run in the inputs' dtype.

Implementations of GAug attention (`gaug_impl` in the model config):
* `dense`: materialises S (B, H, N, N) and adds it to the logits. The reference.
* `fused`: builds S from the two per-query 1-D Gaussians inside the softmax, which subtracts the
  bound `max_j logits_ij + alpha_i` (valid since 0 <= S_ij <= alpha_i) so bias, exp and sum fuse
  in one pass; its backward `p * (g - sum(p * g))` is shared by logits and bias.
Both compute the same function to float32 rounding (tests/test_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from locatvit_jax.models import locat

GAUG_IMPLS = ('dense', 'fused')


def plain_attention(q, k, v):
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
  p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', p, v)


@jax.custom_vjp
def _softmax_with_bounded_bias(logits, bias, bound):
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True) + bound[..., None])
  e = jnp.exp(logits + bias - m)
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(logits, bias, bound):
  p = _softmax_with_bounded_bias(logits, bias, bound)
  return p, (p, bound)


def _softmax_bwd(res, g):
  p, bound = res
  dz = p * (g - jnp.sum(p * g, axis=-1, keepdims=True))
  return dz, dz, jnp.zeros_like(bound)


_softmax_with_bounded_bias.defvjp(_softmax_fwd, _softmax_bwd)


def gaug_attention(q, k, v, var, alpha, *, grid, geometry, num_prefix, impl):
  """Attention with the GAug bias S (spec section 2) added to the logits."""
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
  bias = locat.dense_bias(var, alpha, grid, geometry, num_prefix)
  if impl == 'dense':
    p = jax.nn.softmax(logits + bias, axis=-1)
  elif impl == 'fused':
    bound = jnp.pad(alpha, ((0, 0), (0, 0), (num_prefix, 0)))
    p = _softmax_with_bounded_bias(logits, bias, bound)
  else:
    raise ValueError(f'gaug_impl={impl!r}; expected one of {GAUG_IMPLS}')
  return jnp.einsum('bhqk,bhkd->bhqd', p.astype(v.dtype), v)
