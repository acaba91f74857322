r"""Retrieval (k-NN, Hummingbird) throughput and memory against the size of the memory bank.

  python -m benchmarks.retrieval                       # 10^5, 3x10^5, 10^6 entries x 192 dims, a table
  python -m benchmarks.retrieval --sizes=1000000 --top_k=approx

Times evaluators/retrieval.py's `search` (the jitted, sharded streaming top-k + payload fetch that
the k-NN and Hummingbird evaluators call) on random unit-norm entries whose payload is a 21-class
label distribution (Hummingbird on Pascal VOC): one block of --queries queries, k = 30, on every
local device.
Each size runs in a fresh process (so ru_maxrss is its own) and prints one JSON line: queries_per_s
(median over --iters calls after one warm-up), ms_per_call, cpu_ms (process CPU time of all threads:
less sensitive to other load), ns_per_query_entry and cpu_ns_per_query_entry (wall and CPU time per
query and memory entry: constant when the cost is linear in the memory size), compile_s,
xla_temp_mb (XLA's buffer assignment for the call: the score tiles, bounded by queries x
--memory_chunk whatever the memory size), bank_mb (the memory bank's arrays) and peak_rss_mb.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from locatvit_jax import sharding
from locatvit_jax.evaluators import retrieval

_SIZES = flags.DEFINE_list('sizes', ['100000', '300000', '1000000'], 'Memory bank sizes (entries).')
_DIM = flags.DEFINE_integer('dim', 192, 'Feature width (ViT-Ti: 192).')
_LABELS = flags.DEFINE_integer('labels', 21, 'Label distribution width (Pascal VOC: 21).')
_QUERIES = flags.DEFINE_integer('queries', 1024, 'Queries per call (the evaluator\'s query_block).')
_K = flags.DEFINE_integer('k', 30, 'Neighbours per query.')
_CHUNK = flags.DEFINE_integer('memory_chunk', 65536, 'Memory rows per device per streaming step.')
_TOP_K = flags.DEFINE_enum('top_k', 'exact', ['exact', 'approx'], 'Top-k within each chunk.')
_ITERS = flags.DEFINE_integer('iters', 3, 'Timed calls (median reported).')
_TIMEOUT = flags.DEFINE_integer('timeout', 1800, 'Seconds allowed per size.')


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(size: int, *, dim: int, labels: int, queries: int, k: int, memory_chunk: int, top_k: str,
            iters: int) -> dict:
  """One measurement in this process (module docstring)."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1)))
  rng = np.random.default_rng(0)
  # Built in slices so the host never holds float64 copies of a million rows.
  feats = np.empty((size, dim), np.float32)
  for start in range(0, size, 65536):
    block = rng.standard_normal((min(65536, size - start), dim), dtype=np.float32)
    feats[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
  dists = rng.dirichlet(np.full(labels, 0.1), size=size).astype(np.float32)
  bank = retrieval.make_memory_bank(feats, dists, mesh, memory_chunk=memory_chunk, k=k)
  del feats, dists
  q = rng.standard_normal((queries, dim), dtype=np.float32)
  q = jax.device_put(q / np.linalg.norm(q, axis=1, keepdims=True), sharding.replicated(mesh))
  approx = 0.95 if top_k == 'approx' else None
  call = lambda: jax.block_until_ready(retrieval.search(q, bank, k=k, mesh=mesh, approx_recall=approx))
  t0 = time.perf_counter()
  compiled = retrieval.search.lower(q, bank, k=k, mesh=mesh, approx_recall=approx).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  call()  # warm-up
  times, cpu_times = [], []
  for _ in range(iters):
    t0, c0 = time.perf_counter(), time.process_time()
    call()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  dt = statistics.median(times)
  bank_bytes = sum(x.nbytes for x in (bank.features, bank.payload, bank.bias, bank.ids))
  return {'entries': size, 'dim': dim, 'labels': labels, 'queries': queries, 'k': k, 'top_k': top_k,
          'memory_chunk': bank.chunk, 'devices': mesh.size, 'queries_per_s': round(queries / dt, 1),
          'ms_per_call': round(dt * 1e3, 1), 'cpu_ms': round(statistics.median(cpu_times) * 1e3, 1),
          'ns_per_query_entry': round(dt / (queries * size) * 1e9, 3),
          'cpu_ns_per_query_entry': round(statistics.median(cpu_times) / (queries * size) * 1e9, 3),
          'compile_s': round(compile_s, 2),
          'xla_temp_mb': round(memory.temp_size_in_bytes / 2 ** 20, 1) if memory else None,
          'bank_mb': round(bank_bytes / 2 ** 20, 1), 'peak_rss_mb': round(peak_rss_mb(), 1),
          'backend': jax.default_backend()}


def main(argv):
  del argv
  options = dict(dim=_DIM.value, labels=_LABELS.value, queries=_QUERIES.value, k=_K.value,
                 memory_chunk=_CHUNK.value, top_k=_TOP_K.value, iters=_ITERS.value)
  if len(_SIZES.value) == 1:
    print(json.dumps(measure(int(_SIZES.value[0]), **options)), flush=True)
    return
  rows = []
  for size in _SIZES.value:  # one fresh process per size: its own peak RSS
    cmd = [sys.executable, '-m', 'benchmarks.retrieval', f'--sizes={size}',
           *[f'--{f.name}={f.value}' for f in (_DIM, _LABELS, _QUERIES, _K, _CHUNK, _TOP_K, _ITERS)]]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT.value)
      lines = proc.stdout.strip().splitlines()
      last_error = (proc.stderr.strip().splitlines() or [''])[-1][:200]
      row = (json.loads(lines[-1]) if proc.returncode == 0 and lines
             else {'entries': int(size), 'error': f'exit {proc.returncode}: {last_error}'})
    except subprocess.TimeoutExpired:
      row = {'entries': int(size), 'error': f'timeout after {_TIMEOUT.value}s'}
    print(json.dumps(row), flush=True)
    rows.append(row)
  columns = ('queries_per_s', 'ms_per_call', 'cpu_ms', 'cpu_ns_per_query_entry', 'xla_temp_mb', 'bank_mb',
             'peak_rss_mb')
  print(f'\n{"entries":>9}' + ''.join(f'{c:>20}' for c in columns))
  for r in rows:
    cells = f'  {r["error"]}' if 'error' in r else ''.join(f'{r[c]:>20}' for c in columns)
    print(f'{r["entries"]:>9}{cells}')


if __name__ == '__main__':
  app.run(main)
