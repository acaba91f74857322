"""The fast CPU environment: what it sets, when the entry point re-executes under it (once, argv
and pid intact), and the switch that turns it off."""

import json
import os
import subprocess
import sys

import pytest

from locatvit_jax import cpu_env
from tests.conftest import REPO

FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-individual_dot '
         '--xla_cpu_enable_concurrency_optimized_scheduler=false')


def test_env_with_mimalloc_installed(tmp_path):
  lib = tmp_path / 'libmimalloc.so'
  env = cpu_env.fast_cpu_env({'XLA_FLAGS': '--mine=1', 'LD_PRELOAD': '/x.so', 'PATH': '/bin'}, mimalloc=str(lib))
  assert env == {'XLA_FLAGS': f'{FLAGS} --mine=1', 'LD_PRELOAD': f'/x.so:{lib}', 'PATH': '/bin',
                 'MIMALLOC_PURGE_DELAY': '-1', 'LOCATVIT_FAST_CPU_ENV': 'mimalloc'}
  # The user's own mimalloc setting is kept.
  mine = cpu_env.fast_cpu_env({'MIMALLOC_PURGE_DELAY': '100'}, mimalloc=str(lib))
  assert mine['MIMALLOC_PURGE_DELAY'] == '100'


def test_env_without_mimalloc_uses_glibc_tunables():
  env = cpu_env.fast_cpu_env({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'}, mimalloc='')
  assert env == {'XLA_FLAGS': FLAGS, 'LOCATVIT_FAST_CPU_ENV': 'glibc_tunables',
                 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                                   'glibc.malloc.trim_threshold=68719476736:glibc.malloc.tcache_count=0'}


def test_mimalloc_is_found_in_the_installed_wheel():
  """The dependency pyproject.toml declares on Linux is what fast_cpu_env preloads by default."""
  lib = cpu_env.mimalloc_library()
  assert lib is not None and lib.endswith('/libmimalloc.so')
  assert cpu_env.fast_cpu_env({})['LD_PRELOAD'] == lib


@pytest.mark.parametrize('platforms, expected', [
    ('cpu', True), (' cpu ', True), ('cpu,cpu', True), ('cuda', False), ('tpu,cpu', False), ('cpu,cuda', False),
])
def test_jax_platforms_decides(platforms, expected):
  assert cpu_env.cpu_backend_expected({'JAX_PLATFORMS': platforms}) is expected


@pytest.mark.parametrize('plugin', [None, 'jax_plugins/xla_cuda12/__init__.py', 'libtpu/__init__.py'])
def test_installed_accelerator_plugin_decides_when_jax_platforms_is_unset(tmp_path, plugin):
  if plugin:
    (tmp_path / plugin).parent.mkdir(parents=True)
    (tmp_path / plugin).touch()
  code = 'from locatvit_jax import cpu_env; print(cpu_env.cpu_backend_expected({}))'
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=f'{tmp_path}:{REPO}'))
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [str(plugin is None)]


# The entry point with `main` replaced by a probe: prints the facts of the process it ends up in.
# Each process start prints a `start` line, so two of them (same pid) mean exactly one re-exec.
PROBE = r'''
import ctypes, json, os, sys
print('start', os.getpid(), os.environ.get('LOCATVIT_FAST_CPU_ENV'), flush=True)
from locatvit_jax import cpu_env, main
if os.environ.get('PROBE_HIDES_MIMALLOC'):  # as if the wheel were not installed
  cpu_env.mimalloc_library = lambda: None

class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                                   'fsmblks', 'uordblks', 'fordblks', 'keepcost')]

def mmapped_bytes_of_a_64mb_malloc():
  libc = ctypes.CDLL(None)
  libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
  before = libc.mallinfo2().hblkhd
  p = libc.malloc(64 << 20)  # above glibc's largest mmap threshold (32 MiB)
  after = libc.mallinfo2().hblkhd
  libc.free(ctypes.c_void_p(p))
  return after - before

def probe(argv):
  malloc = 'mimalloc' if hasattr(ctypes.CDLL(None), 'mi_version') else 'glibc'  # the malloc in use
  facts = {'pid': os.getpid(), 'argv': sys.argv[1:], 'mmapped': mmapped_bytes_of_a_64mb_malloc(), 'malloc': malloc,
           **{k: os.environ.get(k) for k in ('LOCATVIT_FAST_CPU_ENV', 'XLA_FLAGS', 'LD_PRELOAD', 'GLIBC_TUNABLES')}}
  if os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu':  # XLA accepts the flags: it aborts on unknown ones
    import jax
    facts['backend'] = jax.default_backend()
  print(json.dumps(facts), flush=True)

main.main = probe
main.cli()
'''
ARGS = ['--config=configs/vit_ti.py', '--workdir=/tmp/w x', '--config.seed=3']


def run_probe(**env):
  # The runner's own allocator settings would be kept (the user's win): start without them.
  unset = ('JAX_PLATFORMS', 'LOCATVIT_FAST_CPU', cpu_env.MARKER, 'LD_PRELOAD', 'GLIBC_TUNABLES')
  base = {k: v for k, v in os.environ.items() if k not in unset}
  out = subprocess.run([sys.executable, '-u', '-c', PROBE, *ARGS], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(base, XLA_FLAGS='--xla_force_host_platform_device_count=2', **env))
  assert out.returncode == 0, out.stderr[-3000:]
  *starts, facts = out.stdout.splitlines()
  return [s.split() for s in starts], json.loads(facts)


def test_entry_point_reexecutes_once_under_the_fast_env():
  starts, facts = run_probe()
  pid = str(facts['pid'])
  assert starts == [['start', pid, 'None'], ['start', pid, 'mimalloc']]  # same process, exactly once
  assert facts['argv'] == ARGS
  assert facts['LOCATVIT_FAST_CPU_ENV'] == 'mimalloc' and facts['backend'] == 'cpu'
  assert facts['LD_PRELOAD'] == cpu_env.mimalloc_library() and facts['GLIBC_TUNABLES'] is None
  assert facts['XLA_FLAGS'] == f'{FLAGS} --xla_force_host_platform_device_count=2'
  assert facts['malloc'] == 'mimalloc'


def test_entry_point_without_mimalloc_sets_glibc_tunables():
  starts, facts = run_probe(PROBE_HIDES_MIMALLOC='1')
  assert starts == [['start', str(facts['pid']), 'None'], ['start', str(facts['pid']), 'glibc_tunables']]
  assert facts['LD_PRELOAD'] is None and facts['malloc'] == 'glibc'
  assert facts['GLIBC_TUNABLES'] == cpu_env.GLIBC_TUNABLES
  assert facts['mmapped'] == 0  # a 64 MB block comes from the heap, not from its own mmap


@pytest.mark.parametrize('env', [{'LOCATVIT_FAST_CPU': '0'}, {'JAX_PLATFORMS': 'tpu'}],
                         ids=['switched_off', 'tpu'])
def test_entry_point_runs_as_started_when_off_or_not_on_cpu(env):
  starts, facts = run_probe(**env)
  assert starts == [['start', str(facts['pid']), 'None']]
  assert facts['argv'] == ARGS and facts['LOCATVIT_FAST_CPU_ENV'] is None and facts['GLIBC_TUNABLES'] is None
  assert facts['LD_PRELOAD'] is None and facts['malloc'] == 'glibc'
  assert facts['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2'
  if 'LOCATVIT_FAST_CPU' in env:  # glibc's default: a 64 MB malloc is its own mmap
    assert facts['mmapped'] >= 64 << 20
