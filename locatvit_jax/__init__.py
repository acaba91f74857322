"""locatvit_jax: Locality-Attending Vision Transformer (LocAtViT) in JAX/Flax NNX.

Public API:
  create_model(name, num_classes=1000, **overrides) -> a freshly initialised NNX model of any family (ViT,
    Swin, RoPE-Mixed ViT, Jumbo); `name` is one of MODEL_NAMES or of MODEL_ALIASES (the authors' and
    timm's spellings, e.g. locatvit_tiny, swin_tiny_patch4_window7_224)
  load(path, **overrides) -> a model in evaluation mode from our or the authors' checkpoints
  get_params(model) -> the params as a plain nested dict (the on-disk layout)
  preprocess(images, model) -> PIL images or uint8 arrays as the float32 batch `model(batch)` classifies
"""

from locatvit_jax.loading import get_params, load
from locatvit_jax.models.registry import create_model
from locatvit_jax.models.vit import ViT, ViTConfig

__all__ = ['create_model', 'load', 'get_params', 'preprocess', 'MODEL_NAMES', 'MODEL_ALIASES', 'ViT', 'ViTConfig']


def __getattr__(name):
  # `preprocess` lives in predict.py, which is also `python -m locatvit_jax.predict`: imported with the
  # package, runpy would warn that the module it is about to run was already imported.
  if name == 'preprocess':
    from locatvit_jax.predict import preprocess
    return preprocess
  # Every family's names: each family's module is imported when first asked for (models/registry.py).
  if name == 'MODEL_NAMES':
    from locatvit_jax.models import registry
    return registry.model_names()
  if name == 'MODEL_ALIASES':
    from locatvit_jax.models import registry
    return registry.model_aliases()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
