"""The authors' timm layouts, one module per model family (rules.py is their shared engine).

Each module has: FAMILY, claims(state, hf), fields(state, hf), config(fields, state), to_ours(state, cfg),
to_timm(flat, cfg) and hf_config(cfg). A checkpoint belongs to the first family that claims it; the ViT,
which claims everything, comes last.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Most specific first: RoPE and Jumbo state dicts also look like a ViT's.
LAYOUT_MODULES = {
    'swin': 'locatvit_jax.layouts.swin',
    'rope': 'locatvit_jax.layouts.rope',
    'jumbo': 'locatvit_jax.layouts.jumbo',
    'vit': 'locatvit_jax.layouts.vit',
}


def layout(family: str) -> ModuleType:
  return importlib.import_module(LAYOUT_MODULES[family])


def for_checkpoint(state: dict, hf: dict) -> ModuleType:
  """The layout of the family a timm state dict (and its config.json `hf`) belongs to."""
  return next(m for m in map(layout, LAYOUT_MODULES) if m.claims(state, hf))


def for_config(cfg) -> ModuleType:
  return layout(cfg.FAMILY)
