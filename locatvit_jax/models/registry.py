"""Model names -> families: every place that names, builds or records a model asks here.

A family is one module of models/ (vit, swin, rope, jumbo) with a config dataclass (a ModelConfig),
its model class, MODEL_NAMES, MODEL_ALIASES (the authors' and timm's spellings) and VARIANTS (the
paper's baselines and ablations as config switches). Each family's module is imported only when asked
for, so that a family never imports the others.

Our records (model_config.json, training checkpoints) are a config's fields plus its `family`; a record
without one is a ViT's, as every record was before there were other families.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from types import ModuleType
from typing import Any, ClassVar

FAMILY_MODULES = {
    'vit': 'locatvit_jax.models.vit',
    'swin': 'locatvit_jax.models.swin',
    'rope': 'locatvit_jax.models.rope',
    'jumbo': 'locatvit_jax.models.jumbo',
}
DEFAULT_FAMILY = 'vit'


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Base of every family's config: serialisation with the family's name, strict reading."""

  FAMILY: ClassVar[str] = ''

  def to_json(self) -> str:
    return json.dumps({'family': self.FAMILY, **dataclasses.asdict(self)}, indent=1)

  def validate(self, positive: dict[str, Any], checks: list[tuple[bool, str]]) -> None:
    """One ValueError: the first of `positive` (name -> value) that is not > 0, else the first failed
    (ok, message) of `checks`, then of the fields every family has (image size, dtype, attention
    implementation, remat, drop path, classes)."""
    from locatvit_jax.models import attention, vit  # here: the families import this module

    for name, value in positive.items():
      if value <= 0:
        raise ValueError(f'{name}={getattr(self, name)}; expected > 0')
    common = [
        (all(s % self.patch_size == 0 for s in self.img_size),
         f'img_size={self.img_size} must be a multiple of patch_size={self.patch_size}'),
        (self.dtype in vit.DTYPES, f'dtype={self.dtype!r}; expected one of {tuple(vit.DTYPES)}'),
        (self.gaug_impl in attention.GAUG_IMPLS,
         f'gaug_impl={self.gaug_impl!r}; expected one of {attention.GAUG_IMPLS}'),
        (self.remat in vit.REMAT_POLICIES, f'remat={self.remat!r}; expected one of {tuple(vit.REMAT_POLICIES)}'),
        (0.0 <= self.drop_path < 1.0, f'drop_path={self.drop_path}; expected 0 <= drop_path < 1'),
        (self.num_classes >= 0, f'num_classes={self.num_classes}; expected >= 0'),
    ]
    for ok, message in checks + common:
      if not ok:
        raise ValueError(message)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    d = dict(d)
    family = d.pop('family', cls.FAMILY)
    if family != cls.FAMILY:
      raise ValueError(f"a {family!r} model record given to the {cls.FAMILY!r} family's config")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown model config keys {unknown}; expected a subset of {sorted(known)}')
    return cls(**d)


def family(name: str) -> ModuleType:
  """The module of family `name` ('vit', 'swin', 'rope', 'jumbo')."""
  if name not in FAMILY_MODULES:
    raise ValueError(f'model family {name!r}; expected one of {tuple(FAMILY_MODULES)}')
  return importlib.import_module(FAMILY_MODULES[name])


def families() -> list[ModuleType]:
  return [family(name) for name in FAMILY_MODULES]


def model_names() -> tuple[str, ...]:
  return tuple(n for f in families() for n in f.MODEL_NAMES)


def model_aliases() -> dict[str, str]:
  return {a: n for f in families() for a, n in f.MODEL_ALIASES.items()}


def family_of_name(name: str) -> ModuleType:
  for f in families():
    if name in f.MODEL_NAMES or name in f.MODEL_ALIASES:
      return f
  raise ValueError(f'unknown model name {name!r}; expected one of {model_names()} or {tuple(model_aliases())}')


def model_config(name: str, **overrides) -> ModelConfig:
  """The config of model `name` (any family, ours or an alias); config fields as overrides."""
  return family_of_name(name).model_config(name, **overrides)


def variant_overrides(name: str, variant: str) -> dict:
  """The config switches of `variant` (a family's VARIANTS: 'locat', 'vit', ...) for model `name`."""
  variants = family_of_name(name).VARIANTS
  if variant not in variants:
    raise ValueError(f'variant {variant!r}; expected one of {sorted(variants)}')
  return dict(variants[variant])


def config_from_dict(record: dict[str, Any]) -> ModelConfig:
  """A config from our record (model_config.json): its `family` picks the class, default ViT."""
  return family(record.get('family', DEFAULT_FAMILY)).Config.from_dict(record)


def family_of_config(cfg: ModelConfig) -> ModuleType:
  return family(cfg.FAMILY)


def build(cfg: ModelConfig, *, rngs):
  """A freshly initialised model of `cfg`."""
  return family_of_config(cfg).Model(cfg, rngs=rngs)


def create_model(name: str, num_classes: int = 1000, *, seed: int = 0, **overrides):
  """Builds a freshly initialised model by name (any family's MODEL_NAMES or MODEL_ALIASES); config
  fields as overrides."""
  from flax import nnx

  return build(model_config(name, num_classes=num_classes, **overrides), rngs=nnx.Rngs(seed))
