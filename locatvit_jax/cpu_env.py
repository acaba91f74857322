"""The CPU environment that makes XLA fast: the one place for it (main, benchmarks, launchers).

Two facts, both of which must be in place before the process starts (XLA reads its flags when JAX
initialises; the allocator is chosen by the dynamic loader):
- XLA flags: plain dots run on Eigen instead of YNN fusions, and XLA:CPU's memory-minimising
  scheduler replaces its concurrency-optimised one. That halved the peak memory of a LocAtViT-Ti
  step at 224 px (6.1 -> 3.1 GB) and made blockwise attention twice as fast at 512 px.
- An allocator that keeps freed pages. XLA:CPU allocates each step's temporaries as one block
  (about 2 GB for a LocAtViT-Ti step at 224 px) and frees it after the step; glibc serves blocks
  above 32 MiB with mmap/munmap, so every step faults all its pages in again (about a quarter of
  a step). mimalloc does not, and it is a dependency of this package on Linux (the `cmeel-mimalloc`
  wheel from PyPI ships libmimalloc.so), so it is preloaded whenever it is installed, with
  MIMALLOC_PURGE_DELAY=-1: by default it returns pages idle for 10 ms, which are those of a compiled
  program while another runs (an evaluation, the benchmark's second model: 5,000-10,000 faults and
  7-16% of a LocAtViT-Ti step at 224 px). Without it,
  glibc's own tunables avoid the faults: one arena (arena_max=1: in a thread's own arena a block
  that large is mmap'd whatever the settings), no mmap'd blocks (mmap_max=0: they come from the
  heap) and a trim threshold that never returns the heap's top to the kernel; raising
  mmap_threshold cannot do it (glibc caps it at 32 MiB). The single arena costs the threads that
  decode and augment images a shared lock, and the heap walk costs small steps CPU time: the
  demo's train step is about 20% faster under mimalloc and compiles about 30% faster (tcmalloc,
  measured too, is as fast, but pip cannot install it). Measurements in benchmarks/README.md.

`locatvit_jax.main` re-executes itself once under this environment (`reexec_if_cpu`) when the
backend will be the CPU, decided without initialising JAX: JAX_PLATFORMS, when set, must name only
`cpu`; when unset, no accelerator plugin may be installed (a `jax_plugins` package or entry point,
or `libtpu`): with one, JAX would pick the accelerator. LOCATVIT_FAST_CPU=0 turns it off. Variables
the user set win: their XLA_FLAGS and GLIBC_TUNABLES come after ours (both keep the last value
of a setting), their MIMALLOC_PURGE_DELAY is kept, and a library in their LD_PRELOAD comes before
mimalloc (the first malloc loaded is the one used).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping

MIMALLOC_DISTRIBUTION, MIMALLOC_FILE = 'cmeel-mimalloc', 'cmeel.prefix/lib/libmimalloc.so'
MIMALLOC_PURGE_DELAY = '-1'  # keep freed pages (module docstring)
CPU_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-individual_dot '
                 '--xla_cpu_enable_concurrency_optimized_scheduler=false')
GLIBC_TUNABLES = 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736'
SWITCH = 'LOCATVIT_FAST_CPU'  # '0' turns the re-execution off
MARKER = 'LOCATVIT_FAST_CPU_ENV'  # set in the re-executed process: never twice


def mimalloc_library() -> str | None:
  """libmimalloc.so of the installed cmeel-mimalloc wheel, or None."""
  try:
    path = importlib.metadata.distribution(MIMALLOC_DISTRIBUTION).locate_file(MIMALLOC_FILE)
  except importlib.metadata.PackageNotFoundError:
    return None
  return str(path) if os.path.exists(path) else None


def fast_cpu_env(base: Mapping[str, str] | None = None, mimalloc: str | None = None) -> dict[str, str]:
  """`base` (default os.environ) with the XLA flags, the allocator and MARKER added; `mimalloc` is
  the library to preload (default: mimalloc_library(); '' for none, so glibc's tunables)."""
  env = dict(os.environ if base is None else base)
  env['XLA_FLAGS'] = f'{CPU_XLA_FLAGS} {env.get("XLA_FLAGS", "")}'.strip()
  library = mimalloc_library() if mimalloc is None else mimalloc
  if library:
    env['LD_PRELOAD'] = ':'.join(p for p in (env.get('LD_PRELOAD'), library) if p)
    env.setdefault('MIMALLOC_PURGE_DELAY', MIMALLOC_PURGE_DELAY)  # the user's own value wins
    env[MARKER] = 'mimalloc'
  else:
    env['GLIBC_TUNABLES'] = ':'.join(p for p in (GLIBC_TUNABLES, env.get('GLIBC_TUNABLES')) if p)
    env[MARKER] = 'glibc_tunables'
  return env


def in_fast_cpu_env(env: Mapping[str, str] | None = None) -> bool:
  return MARKER in (os.environ if env is None else env)


def name() -> str:
  """This process's environment: 'mimalloc', 'glibc_tunables', or 'off'."""
  return os.environ.get(MARKER, 'off')


def _accelerator_plugin() -> str | None:
  """The installed JAX accelerator plugin that would become the default backend, if any."""
  if importlib.util.find_spec('libtpu') is not None:
    return 'libtpu'
  if importlib.util.find_spec('jax_plugins') is not None:  # namespace package of jax-cuda*-plugin etc.
    import jax_plugins  # pylint: disable=import-outside-toplevel  (a bare namespace: imports no JAX)
    import pkgutil  # pylint: disable=import-outside-toplevel
    for module in pkgutil.iter_modules(jax_plugins.__path__):
      return f'jax_plugins.{module.name}'
  for entry in importlib.metadata.entry_points(group='jax_plugins'):
    return entry.value
  return None


def cpu_backend_expected(env: Mapping[str, str] | None = None) -> bool:
  """Whether JAX will run on the CPU, decided without importing it (rule in the module docstring)."""
  platforms = (os.environ if env is None else env).get('JAX_PLATFORMS', '')
  if platforms.strip():
    return {p.strip() for p in platforms.split(',') if p.strip()} == {'cpu'}
  return _accelerator_plugin() is None


def reexec_if_cpu(argv: list[str] | None = None) -> None:
  """Replaces this process (same pid, same command line) by one under fast_cpu_env(), at most once.

  Call before JAX initialises a backend (importing it is fine). Does nothing when LOCATVIT_FAST_CPU=0, when already in the
  environment, or when the backend will not be the CPU. `argv` defaults to the interpreter's own
  command line (sys.orig_argv: interpreter options, `-m module` or the script, then the arguments)."""
  if os.environ.get(SWITCH, '1') == '0' or in_fast_cpu_env() or not cpu_backend_expected():
    return
  argv = list(sys.orig_argv if argv is None else argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], fast_cpu_env())
