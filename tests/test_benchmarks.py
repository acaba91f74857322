"""The benchmarks run end to end and report what benchmarks/README.md tabulates (no speed asserted)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

ONE_DEVICE = dict(os.environ, XLA_FLAGS='')  # the suite's fake 8 devices would split a batch of 2


def bench(*args):
  done = subprocess.run([sys.executable, '-m', 'benchmarks.train_step', '--size=32', '--depth=2', '--batch=2', '--steps=2',
                         '--warmup=0', '--no_cpu_env', *args], cwd=REPO, env=ONE_DEVICE,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_train_step_pair_reports_ratio_and_memory():
  out = bench('--model=locatvit_ti16', '--pair')
  assert out['mode'] == 'train_step' and out['backend'] == 'cpu' and out['cpu_env'] is False
  assert out['depth'] == 2
  assert out['baseline']['model'] == 'vit_ti16'
  for r in (out, out['baseline']):
    assert r['step_ms'] > 0 and r['xla_temp_mb'] > 0
    assert r['img_per_s'] == pytest.approx(2e3 / r['step_ms'], rel=1e-2)
  assert out['ratio'] == pytest.approx(out['step_ms'] / out['baseline']['step_ms'], rel=1e-2)
  assert out['peak_rss_mb'] > 100


def test_forward_with_blockwise_attention():
  out = bench('--model=locatvit_ti16', '--forward', '--gaug_impl=blockwise')
  assert out['mode'] == 'forward' and out['xla_temp_mb'] > 0 and 'ratio' not in out


def test_unknown_model_fails_clearly():
  done = subprocess.run([sys.executable, '-m', 'benchmarks.train_step', '--model=locatvit_xx16', '--no_cpu_env'],
                        cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and 'locatvit_xx16' in done.stderr
