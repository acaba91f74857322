"""locatvit_jax: Locality-Attending Vision Transformer (LocAtViT) in JAX/Flax NNX.

Public API:
  create_model(name, num_classes=1000, **overrides) -> a freshly initialised NNX model
  load(path, **overrides) -> a model in evaluation mode from our or the authors' checkpoints
  get_params(model) -> the params as a plain nested dict (the on-disk layout)
"""

from locatvit_jax.loading import get_params, load
from locatvit_jax.models.vit import MODEL_NAMES, ViT, ViTConfig, create_model

__all__ = ['create_model', 'load', 'get_params', 'MODEL_NAMES', 'ViT', 'ViTConfig']
