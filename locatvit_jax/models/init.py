"""Initialisers as timm uses them for ViT (spec section 1)."""

import jax
import jax.numpy as jnp
from flax import nnx

# timm's trunc_normal_(std=.02) cuts at +-2 *absolute*, i.e. +-100 standard deviations; JAX's
# bounds are in standard deviations, so these are the same distribution.
TRUNC_NORMAL = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
ZEROS = nnx.initializers.zeros_init()
CLS_TOKEN = nnx.initializers.normal(stddev=1e-6)


def torch_conv_default(fan_in: int):
  """PyTorch's default Conv2d init, for its weight and its bias alike: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  (kaiming_uniform_ with a=sqrt(5) for the weight). timm's ViT init leaves the patch embedding's conv
  at this; the bias's bound comes from the weight's fan_in, which its own shape does not tell."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
