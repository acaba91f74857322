r"""Times one attention layer, forward + backward, for each GAug implementation and plain attention.

  python -m benchmarks.attention --impl=blockwise --tokens=1025
  python -m benchmarks.attention --all  # every --impls x --token_list, one subprocess each; a table
  python -m benchmarks.attention --all --dtype=bfloat16 --heads=12 --impls=plain,fused,pallas,cudnn --check

A measurement is the jitted VJP (outputs and gradients w.r.t. q, k, v and, with GAug, var and
alpha) of attention over B x H x tokens x d float32 inputs: one class token and a square patch
grid, GAug constants of a model built for --train_grid (so the distance clamp is active above it).
`cudnn` is a candidate GAug path, not a model option: S materialised as `dense` does (in the
inputs' dtype) and passed as the bias of `jax.nn.dot_product_attention(implementation='cudnn')`
(GPU only), its gradient reaching var and alpha through that bias. --check adds max_rel_err: the
largest of max|x - x_ref| / max|x_ref| over the output and every input gradient, x_ref from `dense`
(plain attention for `plain`) on the same inputs in float32.
Each measurement prints one JSON line: fwd_bwd_ms (median wall time over --iters after --warmup),
min_ms, cpu_ms (median process CPU time of all threads: less sensitive to other load), compile_s,
xla_temp_mb (XLA's buffer assignment: the peak of intermediates, noise-free), base_rss_mb
(process peak with the inputs made, before compiling) and peak_rss_mb (ru_maxrss at the end).
Each runs in a fresh process, so that ru_maxrss is its own. --all runs the children as the
train-step benchmark runs on CPU: under locatvit_jax/cpu_env.py's environment (its XLA flags;
mimalloc or glibc tunables, which keep freed pages, so peak RSS exceeds the live peak);
--no_cpu_env: neither.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from locatvit_jax import cpu_env
from locatvit_jax.models import attention, locat

IMPLS = ('plain',) + attention.GAUG_IMPLS + ('cudnn',)

_IMPL = flags.DEFINE_enum('impl', 'fused', IMPLS, 'Attention implementation; plain = no GAug.')
_TOKENS = flags.DEFINE_integer('tokens', 197, 'Sequence length 1 + s^2 (class token, s x s patches).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Batch size B.')
_HEADS = flags.DEFINE_integer('heads', 3, 'Heads H.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Head dimension d.')
_TRAIN_GRID = flags.DEFINE_integer('train_grid', 14, 'Side of the grid the GAug constants are built for.')
_BLOCKS = flags.DEFINE_list('blocks', None, 'block_q,block_k for blockwise/pallas (default: theirs).')
_ITERS = flags.DEFINE_integer('iters', 10, 'Timed iterations (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed iterations after compilation.')
_ALL = flags.DEFINE_bool('all', False, 'Run every --impls x --token_list in its own subprocess.')
_IMPLS = flags.DEFINE_list('impls', ['plain', 'dense', 'fused', 'blockwise'], 'Implementations for --all.')
_TOKEN_LIST = flags.DEFINE_list('token_list', ['197', '1025', '4097'], 'Sequence lengths for --all.')
_TIMEOUT = flags.DEFINE_integer('timeout', 1800, 'Seconds allowed per subprocess in --all.')
_NO_CPU_ENV = flags.DEFINE_bool('no_cpu_env', False, '--all: children without the fast CPU environment.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'dtype of q, k, v (var, alpha: float32).')
_CHECK = flags.DEFINE_bool('check', False, 'Add max_rel_err against the float32 reference (module docstring).')


def grid_side(tokens: int) -> int:
  side = math.isqrt(max(tokens - 1, 0))
  if side < 1 or 1 + side * side != tokens:
    raise ValueError(f'tokens={tokens}; expected 1 + s^2 for a square s x s grid (197, 1025, 4097, ...)')
  return side


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cudnn_gaug_attention(q, k, v, var, alpha, *, grid, geometry, num_prefix):
  """The `cudnn` candidate: S as a materialised bias of cuDNN's fused attention (module docstring)."""
  s = locat.dense_bias(var, alpha, grid, geometry, num_prefix).astype(q.dtype)
  heads_last = lambda x: jnp.swapaxes(x, 1, 2)  # (B, H, N, d) <-> cuDNN's (B, N, H, d)
  o = jax.nn.dot_product_attention(heads_last(q), heads_last(k), heads_last(v), bias=s, scale=1.0,
                                   implementation='cudnn')
  return heads_last(o)


def attention_fn(impl: str, side: int, geometry, blocks):
  """The attention of `impl` as a function of (q, k, v) or (q, k, v, var, alpha); q pre-scaled."""
  if impl == 'plain':
    return attention.plain_attention
  kwargs = dict(grid=(side, side), geometry=geometry, num_prefix=1)
  if impl == 'cudnn':
    return functools.partial(cudnn_gaug_attention, **kwargs)
  return functools.partial(attention.gaug_attention, impl=impl, blocks=blocks, **kwargs)


def fwd_bwd_of(fn):
  """(args, do) -> (fn(*args), the gradients of <fn(*args), do> w.r.t. args): what is timed."""
  def fwd_bwd(args, do):
    o, vjp = jax.vjp(fn, *args)
    return o, vjp(do)
  return fwd_bwd


def max_rel_err(fn, ref_fn, args, do) -> float:
  """The largest relative error of fn's output and input gradients against ref_fn's in float32."""
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  got = jax.tree.leaves(jax.jit(fwd_bwd_of(fn))(args, do))
  want = jax.tree.leaves(jax.jit(fwd_bwd_of(ref_fn))(f32(args), f32(do)))
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y)) / jnp.max(jnp.abs(y))) for x, y in zip(got, want))


def measure() -> dict:
  """One measurement in this process (see the module docstring)."""
  side = grid_side(_TOKENS.value)
  b, h, n, d = _BATCH.value, _HEADS.value, _TOKENS.value, _HEAD_DIM.value
  geometry = locat.GAugGeometry((_TRAIN_GRID.value,) * 2)
  blocks = tuple(int(x) for x in _BLOCKS.value) if _BLOCKS.value else None
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), _DTYPE.value)
  q, k, v, do = (normal(b, h, n, d) for _ in range(4))
  var = jnp.asarray(rng.uniform(0.5, 8.0, (b, h, side * side, 2)), jnp.float32)
  alpha = jnp.asarray(rng.uniform(0.0, 2.0, (b, h, side * side)), jnp.float32)
  fn = attention_fn(_IMPL.value, side, geometry, blocks)
  args = (q * d ** -0.5, k, v) + (() if _IMPL.value == 'plain' else (var, alpha))

  base_rss = peak_rss_mb()
  t0 = time.perf_counter()
  compiled = jax.jit(fwd_bwd_of(fn)).lower(args, do).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  run = lambda: jax.block_until_ready(compiled(args, do))
  for _ in range(_WARMUP.value):
    run()
  times, cpu_times = [], []
  for _ in range(_ITERS.value):
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  check = {}
  if _CHECK.value:
    reference = attention_fn('plain' if _IMPL.value == 'plain' else 'dense', side, geometry, None)
    check = {'max_rel_err': float(f'{max_rel_err(fn, reference, args, do):.3g}')}
  return {'impl': _IMPL.value, 'tokens': n, 'grid': side, 'batch': b, 'heads': h, 'head_dim': d,
          'dtype': _DTYPE.value, 'blocks': blocks, **check, 'fwd_bwd_ms': round(statistics.median(times) * 1e3, 2),
          'min_ms': round(min(times) * 1e3, 2), 'cpu_ms': round(statistics.median(cpu_times) * 1e3, 2),
          'compile_s': round(compile_s, 2),
          'xla_temp_mb': round(memory.temp_size_in_bytes / 2 ** 20, 1) if memory else None,
          'base_rss_mb': round(base_rss, 1), 'peak_rss_mb': round(peak_rss_mb(), 1),
          'backend': jax.default_backend(), 'cpu_env': cpu_env.name()}


def child_env() -> dict:
  return dict(os.environ) if _NO_CPU_ENV.value else cpu_env.fast_cpu_env()


def error_line(stderr: str) -> str:
  """The exception's own line of a child's traceback (JAX appends a note after it)."""
  lines = stderr.strip().splitlines() or ['']
  return next((l for l in reversed(lines) if re.match(r'[\w.]*(Error|Exception)\b', l)), lines[-1])[:300]


def run_all() -> None:
  """Each impl x tokens in a fresh subprocess; JSON lines as they come, then a table."""
  passthrough = [f'--{f.name}={f.value}'
                 for f in (_BATCH, _HEADS, _HEAD_DIM, _TRAIN_GRID, _ITERS, _WARMUP, _DTYPE, _CHECK)]
  if _BLOCKS.value:
    passthrough.append(f'--blocks={",".join(_BLOCKS.value)}')
  rows = []
  for tokens in _TOKEN_LIST.value:
    for impl in _IMPLS.value:
      cmd = [sys.executable, '-m', 'benchmarks.attention', f'--impl={impl}', f'--tokens={tokens}',
             *passthrough]
      try:
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=_TIMEOUT.value)
        lines = proc.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            'impl': impl, 'tokens': int(tokens), 'error': f'exit {proc.returncode}: {error_line(proc.stderr)}'}
      except subprocess.TimeoutExpired:
        row = {'impl': impl, 'tokens': int(tokens), 'error': f'timeout after {_TIMEOUT.value}s'}
      print(json.dumps(row), flush=True)
      rows.append(row)
  columns = ('fwd_bwd_ms', 'min_ms', 'cpu_ms', 'xla_temp_mb', 'peak_rss_mb') + (('max_rel_err',) if _CHECK.value else ())
  print(f'\n{"tokens":>6} {"impl":>16}' + ''.join(f'{c:>13}' for c in columns))
  for r in rows:
    cells = f'  {r["error"]}' if 'error' in r else ''.join(f'{r[c]:>13}' for c in columns)
    print(f'{r["tokens"]:>6} {r["impl"]:>16}{cells}')


def main(argv):
  del argv
  if _ALL.value:
    run_all()
  else:
    print(json.dumps(measure()), flush=True)


if __name__ == '__main__':
  app.run(main)
