r"""Times the project's real jitted training step (the one `locatvit_jax.main` runs).

  python -m benchmarks.train_step --model=locatvit_ti16 --size=224 --batch=32 --pair
  python -m benchmarks.train_step --model=locatvit_ti16 --size=512 --batch=8 --forward

The last line printed is JSON: img_per_s, step_ms (median over --steps after --warmup; timed_steps
says how many), cpu_ms and minor_faults (medians per step: process CPU time of all threads, page
faults), compile_s, peak_rss_mb (process peak after the primary model ran, before any paired model
is built), xla_temp_mb (XLA's temporary buffers of the compiled step), step_gflop (the matmul FLOPs
of one step of the model's math, benchmarks/flops.py) and tflop_per_s, backend; on GPU/TPU
peak_device_mb (the device allocator's peak bytes in use); with --peak_tflops also mfu =
tflop_per_s / peak_tflops; with --profile_dir also profile_dir (the traces, see the flag); with
--pair also the family's baseline (the same model with GAug and PRR off: plain ViT, Swin,
RoPE-Mixed ViT, Jumbo) timed the same way in the same process, in alternating blocks of PAIR_BLOCK
timed steps after an untimed one, and `ratio` = primary step time / baseline step time.

On CPU the benchmark re-executes itself once under the fast CPU environment that
`locatvit_jax.main` uses (locatvit_jax/cpu_env.py: XLA flags, mimalloc or glibc tunables);
`cpu_env` in the JSON names the allocator ('off' with --no_cpu_env or LOCATVIT_FAST_CPU=0).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

from absl import app, flags

from locatvit_jax import cpu_env

_MODEL = flags.DEFINE_string('model', 'locatvit_ti16', 'Model name (locatvit_jax.MODEL_NAMES).')
_SIZE = flags.DEFINE_integer('size', 224, 'Square image size in pixels.')
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed steps (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_PAIR = flags.DEFINE_bool('pair', False, "Also time the family's baseline (the same model without GAug and "
                          "PRR); report the ratio.")
_FORWARD = flags.DEFINE_bool('forward', False, 'Time the inference forward (dense features) instead.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Matmul dtype.')
_GAUG_IMPL = flags.DEFINE_string('gaug_impl', None, 'GAug implementation (default: the config default).')
_REMAT = flags.DEFINE_enum('remat', 'none', ['none', 'full', 'dots'], 'Activation checkpointing policy.')
_DEPTH = flags.DEFINE_integer('depth', None, "Blocks (default: the model's); fewer for a quick check.")
_NO_CPU_ENV = flags.DEFINE_bool('no_cpu_env', False, 'Do not re-execute under the fast CPU environment.')
_PROFILE_DIR = flags.DEFINE_string('profile_dir', None, 'After timing, trace PROFILE_STEPS steps of each model '
                                   'with jax.profiler into DIR/<model>/plugins/profile/<run>/ (TensorBoard, '
                                   'Perfetto).')
_PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', None, "The device's peak rate (e.g. 989 for an H100/H200's "
                                  'dense bf16): adds mfu.')


# Steps in a --profile_dir trace: enough to see one step whole between its neighbours.
PROFILE_STEPS = 3
# Timed steps of one model in a row with --pair, after an untimed one.
PAIR_BLOCK = 2


def bench_config(model: str, variant: str | None = None):
  """The classification config of `model` (any family), with `variant`'s switches (None: the name's own)."""
  from locatvit_jax.configs import common
  config = common.classification_config(model, variant)  # an unknown name is one clear error
  config.model.img_size = _SIZE.value
  # The evaluation transform's resize must cover the centre crop (the trainer checks); the step never evaluates.
  config.aug.eval_resize = max(config.aug.eval_resize, _SIZE.value)
  config.model.dtype = _DTYPE.value
  config.model.remat = _REMAT.value
  if _DEPTH.value:
    if 'depth' not in config.model:
      raise ValueError(f'--depth: {model} has no single depth field; its blocks are config.model fields '
                       f'{sorted(config.model)}')
    config.model.depth = _DEPTH.value
  if _GAUG_IMPL.value:
    config.model.gaug_impl = _GAUG_IMPL.value
  config.batch_size = config.eval_batch_size = _BATCH.value
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  return config


def program(setup, state, batch):
  """What is timed and its arguments: the jitted train step, or (--forward) the dense features."""
  import jax
  if not _FORWARD.value:
    return setup.train_step, (state, setup.rest, batch)
  graphdef = setup.graphdef

  def features(params, rest, images):
    from flax import nnx
    m = nnx.merge(graphdef, params, rest)
    m.eval()
    return m.features(images)
  return jax.jit(features), (state['params'], setup.rest, batch['image'])


def model_flops(config, mesh, batch) -> int:
  """Matmul FLOPs of one step of the model's own math, MFU's numerator (benchmarks/flops.py): traced
  with GAug as `fused` whatever --gaug_impl times, so that the padding of tiles and the recomputation
  of a flash backward (`blockwise`, `pallas`) do not count as model work. Tracing only: nothing is
  compiled or allocated."""
  import copy
  import jax
  from benchmarks import flops
  from locatvit_jax.train import classification
  config = copy.deepcopy(config)
  if 'gaug_impl' in config.model:
    config.model.gaug_impl = 'fused'
  setup = classification.build(config, classification.check_config(config, mesh), mesh, total_steps=1000,
                               warmup_steps=10)
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  fn, args = program(setup, setup.abstract_state, jax.tree.map(abstract, batch))
  return flops.matmul_flops(fn.trace(*args))


class Runner:
  """One model's jitted step and inputs; `step()` runs and waits for one step."""

  def __init__(self, model: str, variant: str | None = None):
    import jax
    import numpy as np
    from locatvit_jax import sharding
    from locatvit_jax.train import classification

    config = bench_config(model, variant)
    mesh = sharding.make_mesh(config.mesh)
    model_cfg = classification.check_config(config, mesh)
    self.gaug_impl = config.model.get('gaug_impl')
    setup = classification.build(config, model_cfg, mesh, total_steps=1000, warmup_steps=10)
    rng = np.random.default_rng(0)
    batch = {'image': rng.normal(size=(_BATCH.value, _SIZE.value, _SIZE.value, 3)).astype(np.float32),
             'label': rng.integers(0, model_cfg.num_classes, _BATCH.value).astype(np.int32)}
    self.batch = sharding.to_global(batch, mesh)
    self.rest = setup.rest
    self.state = setup.init_state()
    self.flops = model_flops(config, mesh, self.batch)
    t0 = time.perf_counter()
    fn, args = program(setup, self.state, self.batch)
    compiled = fn.lower(*args).compile()
    self.memory = compiled.memory_analysis()
    if _FORWARD.value:
      self._run = lambda: compiled(*args).block_until_ready()
    else:
      def run():
        self.state, scalars = compiled(self.state, self.rest, self.batch)
        jax.block_until_ready(scalars)
      self._run = run
    self._run()
    self.compile_s = time.perf_counter() - t0
    for _ in range(_WARMUP.value):
      self._run()
    self.times, self.cpu_times, self.faults = [], [], []

  def step(self, timed: bool = True) -> None:
    if not timed:
      self._run()
      return
    t0, c0, f0 = time.perf_counter(), time.process_time(), minor_faults()
    self._run()
    self.times.append(time.perf_counter() - t0)
    self.cpu_times.append(time.process_time() - c0)
    self.faults.append(minor_faults() - f0)

  def profile(self, log_dir: str) -> None:
    """PROFILE_STEPS steps under jax.profiler, untimed."""
    import jax
    with jax.profiler.trace(log_dir):
      for _ in range(PROFILE_STEPS):
        self._run()

  def clear(self) -> None:
    for series in (self.times, self.cpu_times, self.faults):
      series.clear()

  def result(self) -> dict:
    step_s = statistics.median(self.times)
    tflop_per_s = self.flops / step_s / 1e12
    mfu = {'mfu': round(tflop_per_s / _PEAK_TFLOPS.value, 4)} if _PEAK_TFLOPS.value else {}
    return {'step_ms': round(step_s * 1e3, 2), 'timed_steps': len(self.times),
            'img_per_s': round(_BATCH.value / step_s, 3),
            'step_gflop': float(f'{self.flops / 1e9:.6g}'), 'tflop_per_s': round(tflop_per_s, 2), **mfu,
            # CPU time of all threads and page faults: what other load on the machine distorts least.
            'cpu_ms': round(statistics.median(self.cpu_times) * 1e3, 2),
            'minor_faults': int(statistics.median(self.faults)),
            'compile_s': round(self.compile_s, 2),
            # XLA's own buffers of the compiled step: deterministic, unlike the process RSS.
            'xla_temp_mb': round(self.memory.temp_size_in_bytes / 2**20, 1)}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_mb() -> dict:
  """{'peak_device_mb': the device allocator's peak bytes in use} where the backend reports it (GPU, TPU)."""
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  return {'peak_device_mb': round(stats['peak_bytes_in_use'] / 2**20, 1)} if 'peak_bytes_in_use' in stats else {}


def minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv):
  del argv
  if not _NO_CPU_ENV.value:
    cpu_env.reexec_if_cpu()
  import jax
  from locatvit_jax.models import registry
  primary = Runner(_MODEL.value)
  for _ in range(_STEPS.value):
    primary.step()
  out = {'model': _MODEL.value, 'depth': _DEPTH.value or registry.model_config(_MODEL.value).depth,
         'size': _SIZE.value, 'batch': _BATCH.value,
         'mode': 'forward' if _FORWARD.value else 'train_step', 'dtype': _DTYPE.value,
         'remat': _REMAT.value, 'gaug_impl': primary.gaug_impl, **primary.result(),
         'peak_rss_mb': round(peak_rss_mb(), 1), **peak_device_mb(),
         'backend': jax.default_backend(), 'devices': jax.device_count(),
         'cpu_env': cpu_env.name()}
  if _PAIR.value:
    # The family's own baseline: the same model with GAug and PRR off.
    baseline_name = f'{_MODEL.value}:vit'
    baseline = Runner(_MODEL.value, 'vit')
    primary.clear()
    # Alternating blocks, so that drift hits both models alike, each block's first step untimed: on
    # XLA:CPU a step that follows the other model's step runs slower (LocAtViT-Ti after its ViT at
    # 512 px: +9 %, with more CPU time and the same page faults; benchmarks/README.md), which
    # training, stepping one model, never pays.
    while len(primary.times) < _STEPS.value:
      for runner in (primary, baseline):
        runner.step(timed=False)
        for _ in range(min(PAIR_BLOCK, _STEPS.value - len(runner.times))):
          runner.step()
    out.update({k: v for k, v in primary.result().items() if k != 'compile_s'})
    out['baseline'] = {'model': baseline_name, **baseline.result()}
    out['ratio'] = round(statistics.median(primary.times) / statistics.median(baseline.times), 4)
  if _PROFILE_DIR.value:
    for name, runner in [(_MODEL.value, primary)] + ([(baseline_name, baseline)] if _PAIR.value else []):
      runner.profile(os.path.join(_PROFILE_DIR.value, name.replace(':', '_')))
    out['profile_dir'] = _PROFILE_DIR.value
  print(json.dumps(out), flush=True)


if __name__ == '__main__':
  app.run(main)
