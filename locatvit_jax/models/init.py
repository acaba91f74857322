"""Initialisers as timm uses them for ViT (spec section 1)."""

from flax import nnx

# timm's trunc_normal_(std=.02) cuts at +-2 *absolute*, i.e. +-100 standard deviations; JAX's
# bounds are in standard deviations, so these are the same distribution.
TRUNC_NORMAL = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)
ZEROS = nnx.initializers.zeros_init()
CLS_TOKEN = nnx.initializers.normal(stddev=1e-6)
