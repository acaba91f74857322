"""Matmul FLOPs of a traced JAX program: the numerator of MFU, the same on every backend.

XLA's own counts do not serve here: the GPU plugin analyses only the compiled program, where the
matrix products are cuBLAS calls it does not count (3.0 of 27.1 TFLOP for LocAtViT-B's step at batch
256), and a Pallas kernel is opaque to both. This walks the jaxpr instead: every dot_general and
convolution at 2 FLOPs per multiply-add, through nested jaxprs (jit, custom VJPs, remat, the branches
of a cond: the largest), a scan's body times its length and a Pallas kernel times its grid.
Elementwise work (softmax, norms, GELU, GAug's maps) is left out, as MFU conventionally does.
"""

from __future__ import annotations

import math

from jax.extend import core


def matmul_flops(jaxpr) -> int:
  """FLOPs of the dot_generals and convolutions of a (Closed)Jaxpr, or of anything with `.jaxpr`
  (jax.jit(f).trace(...))."""
  if not isinstance(jaxpr, (core.ClosedJaxpr, core.Jaxpr)):
    jaxpr = jaxpr.jaxpr
  if isinstance(jaxpr, core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  return sum(_eqn_flops(eqn) for eqn in jaxpr.eqns)


def _eqn_flops(eqn) -> int:
  name, params = eqn.primitive.name, eqn.params
  if name == 'dot_general':
    (lhs_contracting, _), _ = params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contracting)
  if name == 'conv_general_dilated':
    kernel = eqn.invars[1].aval.shape
    out_features = kernel[params['dimension_numbers'].rhs_spec[0]]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // out_features
  if name == 'cond':
    return max(matmul_flops(branch) for branch in params['branches'])
  inner = sum(matmul_flops(v) for v in params.values() if isinstance(v, (core.ClosedJaxpr, core.Jaxpr)))
  if name == 'scan':
    return inner * params['length']
  if name == 'pallas_call':
    return inner * math.prod(params['grid_mapping'].grid)
  return inner
