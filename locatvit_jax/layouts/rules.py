"""The engine of every family's layout: a key map of templates plus per-tensor transforms (bonsai's form).

A rule pairs a timm key template with our '/'-joined param path and a transform. `{i}`, `{j}`, ... stand
for indices (blocks, stages). Transforms are exact (transposes), so timm -> ours -> timm is bit-identical.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

# name: (timm -> ours, ours -> timm)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    'none': (lambda t: t, lambda t: t),
    'linear': (lambda t: t.T, lambda t: t.T),  # (out, in) <-> (in, out)
    'conv': (lambda t: t.transpose(2, 3, 1, 0), lambda t: t.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
}


def _regex(template: str) -> re.Pattern:
  # '{i}' in a template is '\{i\}' once escaped.
  return re.compile('^' + re.sub(r'\\\{(\w+)\\\}', r'(?P<\1>\\d+)', re.escape(template)) + '$')


class RuleTable:
  """Renames and transforms flat state dicts both ways by a list of (timm, ours, transform) rules.

  `keep(timm_key)` filters the rules per call, for keys whose meaning depends on the config (e.g. the
  ViT's `norm` vs `fc_norm`); the first kept rule that matches wins.
  """

  def __init__(self, rules: list[tuple[str, str, str]]):
    unknown = sorted({tr for _, _, tr in rules} - set(TRANSFORMS))
    if unknown:
      raise ValueError(f'unknown transforms {unknown}; expected {sorted(TRANSFORMS)}')
    self.rules = list(rules)
    self._timm = [(_regex(t), o, tr) for t, o, tr in rules]
    self._ours = [(_regex(o), t, tr) for t, o, tr in rules]

  def to_ours(self, state: dict, keep: Callable[[str], bool] = lambda key: True, what: str = '') -> dict:
    """Flat timm state dict -> flat {our/path: array}."""
    out = {}
    for key, tensor in state.items():
      for pattern, ours, tr in self._timm:
        m = pattern.match(key)
        if m and keep(key):
          out[ours.format(**m.groupdict())] = TRANSFORMS[tr][0](np.asarray(tensor))
          break
      else:
        raise ValueError(f'no rule for timm key {key!r}{what}')
    return out

  def to_timm(self, flat: dict, keep: Callable[[str], bool] = lambda key: True) -> dict:
    """Flat {our/path: array} -> timm state dict, contiguous (safetensors needs it; transposes are views)."""
    out = {}
    for path, tensor in flat.items():
      for pattern, timm_key, tr in self._ours:
        m = pattern.match(path)
        if m and keep(timm_key):
          out[timm_key.format(**m.groupdict())] = np.ascontiguousarray(TRANSFORMS[tr][1](np.asarray(tensor)))
          break
      else:
        raise ValueError(f'no timm name for our parameter {path!r}')
    return out
