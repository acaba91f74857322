"""The CPU environment that makes XLA fast, shared by the benchmarks.

XLA's per-step buffers are mmapped and unmapped every step under glibc malloc (about a quarter of a
training step in page faults on this CPU). tcmalloc with TCMALLOC_RELEASE_RATE=0 keeps them; the
XLA flag routes plain dots to Eigen instead of YNN fusions.
"""

import os

TCMALLOC = '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'
CPU_XLA_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=-individual_dot'


def fast_cpu_env(base: dict | None = None) -> dict | None:
  """`base` (default os.environ) with tcmalloc preloaded and the XLA flag added; None if no tcmalloc."""
  base = dict(os.environ if base is None else base)
  if not os.path.exists(TCMALLOC):
    return None
  return dict(base, LD_PRELOAD=TCMALLOC, TCMALLOC_RELEASE_RATE='0',
              XLA_FLAGS=(base.get('XLA_FLAGS', '') + ' ' + CPU_XLA_FLAGS).strip())


def in_fast_cpu_env() -> bool:
  return os.environ.get('LD_PRELOAD') == TCMALLOC
