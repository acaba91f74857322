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
  out = bench('--model=locatvit_ti16', '--pair', '--peak_tflops=0.5')
  assert out['mode'] == 'train_step' and out['backend'] == 'cpu' and out['cpu_env'] == 'off'
  assert out['depth'] == 2 and out['gaug_impl'] == 'fused'
  assert out['baseline']['model'] == 'locatvit_ti16:vit'
  assert out['timed_steps'] == out['baseline']['timed_steps'] == 2  # --steps each, the switch steps untimed
  for r in (out, out['baseline']):
    assert r['step_ms'] > 0 and r['xla_temp_mb'] > 0 and r['cpu_ms'] > 0 and r['minor_faults'] >= 0
    assert r['img_per_s'] == pytest.approx(2e3 / r['step_ms'], rel=1e-2)
    assert r['tflop_per_s'] == pytest.approx(r['step_gflop'] / r['step_ms'], rel=0.05, abs=0.01)
    assert r['mfu'] == pytest.approx(r['tflop_per_s'] / 0.5, rel=0.05, abs=0.01)
  # GAug's maps and PRR add little matmul work: 2.7 % of this 2-image, 5-token step (the maps' folded
  # kernel is composed once per step), 1.5 % of LocAtViT-Ti's at 224 px batch 32.
  assert 1 < out['step_gflop'] / out['baseline']['step_gflop'] < 1.05
  assert out['ratio'] == pytest.approx(out['step_ms'] / out['baseline']['step_ms'], rel=1e-2)
  assert out['peak_rss_mb'] > 100


def test_profile_traces_each_model_of_the_pair(tmp_path):
  out = bench('--model=locatvit_ti16', '--pair', f'--profile_dir={tmp_path}')
  assert out['profile_dir'] == str(tmp_path)
  for name in ('locatvit_ti16', 'locatvit_ti16_vit'):
    assert len(list((tmp_path / name).glob('plugins/profile/*/*.xplane.pb'))) == 1, name


def test_forward_with_blockwise_attention_in_the_fast_cpu_env():
  out = bench('--model=locatvit_ti16', '--forward', '--gaug_impl=blockwise', fast_cpu_env=True)
  assert out['mode'] == 'forward' and out['xla_temp_mb'] > 0 and 'ratio' not in out
  assert out['gaug_impl'] == 'blockwise' and 'mfu' not in out and 'peak_device_mb' not in out
  # the model's FLOPs, not blockwise's padded tiles: those of the fused forward
  assert out['step_gflop'] == bench('--model=locatvit_ti16', '--forward')['step_gflop'] > 0
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


# -- flops.py: matmul FLOPs of a jaxpr against hand counts -------------------------------------------
def test_matmul_flops_of_attention_forward_and_backward():
  import jax
  import jax.numpy as jnp
  from benchmarks.flops import matmul_flops
  from locatvit_jax.models import attention, locat

  side, b, h, d = 8, 2, 3, 16
  n = 1 + side * side
  q = jnp.ones((b, h, n, d))
  var, alpha = jnp.ones((b, h, side * side, 2)), jnp.ones((b, h, side * side))
  geometry = locat.GAugGeometry((side, side))
  forward = 2 * 2 * b * h * n * n * d  # q k^T and p v, 2 FLOPs per multiply-add
  for impl, tokens in (('dense', n), ('fused', n), ('pallas_interpret', 80)):  # pallas: 16-row tiles, 65 -> 80
    f = lambda *a: attention.gaug_attention(*a, grid=(side, side), geometry=geometry, num_prefix=1, impl=impl,
                                            blocks=(16, 16))
    assert matmul_flops(jax.jit(f).trace(q, q, q, var, alpha)) == forward * tokens ** 2 // n ** 2, impl
  fused = lambda *a: attention.gaug_attention(*a, grid=(side, side), geometry=geometry, num_prefix=1, impl='fused')
  fwd_bwd = lambda *a: jax.vjp(fused, *a)[1](q)
  assert matmul_flops(jax.jit(fwd_bwd).trace(q, q, q, var, alpha)) == 3 * forward  # dq, dk, dv, dp: 4 more


def test_matmul_flops_through_scan_cond_and_convolution():
  import jax
  import jax.numpy as jnp
  from benchmarks.flops import matmul_flops

  w = jnp.ones((4, 4))
  chain = lambda a: jax.lax.scan(lambda c, _: (c @ w, None), a, None, length=7)[0]
  assert matmul_flops(jax.jit(chain).trace(jnp.ones((3, 4)))) == 7 * 2 * 3 * 4 * 4
  branches = lambda p, a: jax.lax.cond(p, lambda a: a @ w @ w, lambda a: a @ w, a)
  assert matmul_flops(jax.jit(branches).trace(True, jnp.ones((3, 4)))) == 2 * 2 * 3 * 4 * 4  # the larger
  # a 16x16 patch embedding of a 32x32 RGB image to width 8: 4 patches x 8 outputs x 768 inputs
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (16, 16), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert matmul_flops(jax.jit(conv).trace(jnp.ones((1, 32, 32, 3)), jnp.ones((16, 16, 3, 8)))) == 2 * 4 * 8 * 768


def test_attention_all_checks_against_dense_and_reports_failures_by_their_error():
  done = subprocess.run([sys.executable, '-m', 'benchmarks.attention', '--all', '--no_cpu_env', '--check',
                         '--impls=dense,fused,cudnn', '--token_list=17', '--batch=1', '--heads=2',
                         '--iters=1', '--warmup=0', '--dtype=float32'],
                        cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = {r['impl']: r for r in map(json.loads, done.stdout.split('\n\n')[0].splitlines())}
  assert rows['dense']['dtype'] == 'float32' and rows['dense']['tokens'] == 17
  # the reference is dense itself; fused differs from it by float32 rounding
  assert rows['dense']['max_rel_err'] == 0 and 0 < rows['fused']['max_rel_err'] < 1e-5
  # cuDNN's attention exists only on GPU: its row names the exception, not JAX's traceback note
  assert rows['cudnn']['error'].startswith('exit 1: ') and 'cuDNN' in rows['cudnn']['error']
