"""The CPU environment that makes XLA fast, shared by the benchmarks.

XLA's per-step buffers are mmapped and unmapped every step under glibc malloc (about a quarter of a
training step in page faults on this CPU). tcmalloc with TCMALLOC_RELEASE_RATE=0 keeps them. The
XLA flags route plain dots to Eigen instead of YNN fusions, and replace XLA:CPU's concurrency-
optimised scheduler by its memory-minimising one: that halved the peak memory of a LocAtViT-Ti
step at 224 px (6.1 -> 3.1 GB) and made the blockwise attention twice as fast at 512 px; in a toy
stack of 8 attention blocks, remat cut XLA's temporaries 560 -> 120 MB under it, but only
788 -> 722 MB under the default scheduler. launch/local_multiprocess.sh sets the
same flags (tests/test_launch.py checks they agree).
"""

import os

TCMALLOC = '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4'
CPU_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-individual_dot '
                 '--xla_cpu_enable_concurrency_optimized_scheduler=false')


def fast_cpu_env(base: dict | None = None) -> dict | None:
  """`base` (default os.environ) with tcmalloc preloaded and the XLA flags added; None if no tcmalloc."""
  base = dict(os.environ if base is None else base)
  if not os.path.exists(TCMALLOC):
    return None
  return dict(base, LD_PRELOAD=TCMALLOC, TCMALLOC_RELEASE_RATE='0',
              XLA_FLAGS=(base.get('XLA_FLAGS', '') + ' ' + CPU_XLA_FLAGS).strip())


def in_fast_cpu_env() -> bool:
  return os.environ.get('LD_PRELOAD') == TCMALLOC
