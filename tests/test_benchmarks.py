"""The benchmarks run end to end and report what benchmarks/README.md tabulates (no speed asserted)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

ONE_DEVICE = dict(os.environ, XLA_FLAGS='')  # the suite's fake 8 devices would split a batch of 2


def bench(*args, fast_cpu_env=False):
  done = subprocess.run([sys.executable, '-m', 'benchmarks.train_step', '--size=32', '--depth=2', '--batch=2', '--steps=2',
                         '--warmup=0', *([] if fast_cpu_env else ['--no_cpu_env']), *args], cwd=REPO, env=ONE_DEVICE,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_train_step_pair_reports_ratio_and_memory():
  out = bench('--model=locatvit_ti16', '--pair')
  assert out['mode'] == 'train_step' and out['backend'] == 'cpu' and out['cpu_env'] == 'off'
  assert out['depth'] == 2
  assert out['baseline']['model'] == 'locatvit_ti16:vit'
  for r in (out, out['baseline']):
    assert r['step_ms'] > 0 and r['xla_temp_mb'] > 0 and r['cpu_ms'] > 0 and r['minor_faults'] >= 0
    assert r['img_per_s'] == pytest.approx(2e3 / r['step_ms'], rel=1e-2)
  assert out['ratio'] == pytest.approx(out['step_ms'] / out['baseline']['step_ms'], rel=1e-2)
  assert out['peak_rss_mb'] > 100


def test_forward_with_blockwise_attention_in_the_fast_cpu_env():
  out = bench('--model=locatvit_ti16', '--forward', '--gaug_impl=blockwise', fast_cpu_env=True)
  assert out['mode'] == 'forward' and out['xla_temp_mb'] > 0 and 'ratio' not in out
  assert out['cpu_env'] == 'mimalloc'


def test_unknown_model_fails_clearly():
  done = subprocess.run([sys.executable, '-m', 'benchmarks.train_step', '--model=locatvit_xx16', '--no_cpu_env'],
                        cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and 'locatvit_xx16' in done.stderr


# -- compare_pytorch.py: its driver logic without PyTorch (the runs themselves need the scratch venv) --
def test_compare_pytorch_table_from_runs():
  from benchmarks import compare_pytorch
  rows = [dict(kind='ours', size=224, batch=32, img_per_s=v, ratio=r) for v, r in ((12.0, 1.04), (14.0, 1.06))]
  rows += [dict(kind='ours_vit', size=224, batch=32, img_per_s=13.0),
           dict(kind='authors_locatvit', size=224, batch=32, img_per_s=10.0),
           dict(kind='timm_vit', size=224, batch=32, img_per_s=20.0)]
  text = compare_pytorch.table(rows, 'header')
  # medians over rounds: ours 13.0 -> 1.30x the authors', 0.65x timm's ViT; GAug+PRR cost 1.05
  assert '| 224, 32 | 10.00 | 20.00 | 13.00 | 13.00 | **1.30x** | 0.65x | 1.050 |' in text.splitlines()


def test_compare_pytorch_bad_sizes_fail_before_any_run():
  done = subprocess.run([sys.executable, '-m', 'benchmarks.compare_pytorch', '--sizes=224:32,200:8',
                         '--setup=/nonexistent/x'], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert done.returncode == 2 and not done.stdout
  assert done.stderr.strip().splitlines()[-1] == ("compare_pytorch.py: error: --sizes item '200:8'; expected "
                                                  "SIZE:BATCH with SIZE a multiple of 16, e.g. 224:32")


def test_train_step_at_an_image_size_above_the_evaluation_resize():
  # The recipe's evaluation resize (248) must not stop a 512 px benchmark of the train step.
  out = bench('--model=locatvit_ti16', '--size=256', '--depth=1', '--batch=1')
  assert out['size'] == 256 and out['step_ms'] > 0
