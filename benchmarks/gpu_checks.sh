#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md ("On a GPU"), on one CUDA device:
#   bash benchmarks/gpu_checks.sh OUT_DIR [PART ...]   # parts: tests train_step attention profile
#                                                       # (default: the first three)
# tests:      the compiled Pallas kernels and the model under each GAug path, against dense and the
#             authors' outputs (tests/test_attention.py; needs ../shared/parity beside the checkout).
# train_step: LocAtViT-B/16 bf16: the step's MFU at 224 (vs its ViT), device memory and speed at 512 and
#             1024 px for fused, blockwise and pallas.
# attention:  one ViT-B attention layer (12 heads of 64), forward + backward, bf16, each GAug path and the
#             cuDNN candidate, with max_rel_err against float32 dense.
# profile:    jax.profiler traces of LocAtViT-B/16's bf16 step at 224 px batch 256 (pallas) and of its
#             ViT, under OUT_DIR/profile/ (TensorBoard or Perfetto): where the MFU goes.
# Each part writes logs and JSON lines under OUT_DIR as it goes, and OUT_DIR/summary.txt says how each
# step ended; a failing step does not stop the next. BUDGET_S (default 3600) caps the whole run: each
# step gets at most what is left. CONFIGS replaces train_step's list of configurations. PEAK_TFLOPS
# (default 989, the H100/H200 datasheet's dense bf16) is the MFU's denominator.
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [tests|train_step|attention|profile ...]}
shift
parts=${*:-tests train_step attention}
for part in $parts; do
  [[ $part =~ ^(tests|train_step|attention|profile)$ ]] ||
    { echo "unknown part $part; expected tests, train_step, attention or profile" >&2; exit 2; }
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Grow GPU memory on demand, so that peak_device_mb is each run's own and parallel compiles fit.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
deadline=$((SECONDS + ${BUDGET_S:-3600}))
peak=${PEAK_TFLOPS:-989}

# `step NAME SECONDS CMD...`: CMD's output to OUT_DIR/NAME.log, within SECONDS and the budget left.
step() {
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  local left=$((deadline - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit <= 0)); then echo "[$name] skipped: budget spent" | tee -a "$out/summary.txt"; return; fi
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "[$name] exit $? after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())' \
  2>&1 | tee -a "$out/summary.txt"

for part in $parts; do
  case $part in
  tests)
    step tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k 'pallas or parity or bfloat16'
    ;;
  train_step)
    bench=(python3 -m benchmarks.train_step --no_cpu_env --model=locatvit_b16 --dtype=bfloat16
           --peak_tflops="$peak")
    # The ceiling this device reaches: an 8192^3 bf16 matmul, median of 20.
    step matmul 120 python3 -c '
import statistics, time, jax, jax.numpy as jnp
a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
f = jax.jit(lambda a: a @ a)
f(a).block_until_ready()
times = []
for _ in range(20):
  t0 = time.perf_counter(); f(a).block_until_ready(); times.append(time.perf_counter() - t0)
print({"matmul_tflop_per_s": round(2 * 8192 ** 3 / statistics.median(times) / 1e12, 1)})'
    # Compile every configuration at once (compilation is CPU-bound), filling the persistent cache,
    # then time them one at a time from the cache.
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/locatvit_gpu_cache}
    export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
    # "SIZE BATCH GAUG_IMPL [--pair]"; CONFIGS="...;..." runs others (the same form, ';' between).
    IFS=';' read -r -a configs <<<"${CONFIGS:-224 256 fused --pair;224 256 pallas --pair;224 512 fused;512 16 fused;512 16 blockwise;512 16 pallas;1024 4 fused;1024 4 blockwise;1024 4 pallas}"
    for c in "${configs[@]}"; do
      read -r size batch impl extra <<<"$c"
      step "compile_${size}_${batch}_$impl" 300 "${bench[@]}" --size="$size" --batch="$batch" --gaug_impl="$impl" --steps=1 \
        --warmup=0 $extra &
    done
    wait
    for c in "${configs[@]}"; do
      read -r size batch impl extra <<<"$c"
      step "train_step_${size}_${batch}_$impl" 180 "${bench[@]}" --size="$size" --batch="$batch" --gaug_impl="$impl" --steps=10 \
        --warmup=3 $extra
      tail -n 1 "$out/train_step_${size}_${batch}_$impl.log" >>"$out/train_step.jsonl"
    done
    ;;
  profile)
    step profile 400 python3 -m benchmarks.train_step --no_cpu_env --model=locatvit_b16 --dtype=bfloat16 \
      --size=224 --batch=256 --gaug_impl=pallas --pair --steps=5 --warmup=2 --peak_tflops="$peak" \
      --profile_dir="$out/profile"
    ;;
  attention)
    step attention 600 python3 -m benchmarks.attention --all --no_cpu_env --dtype=bfloat16 --heads=12 --batch=8 \
      --iters=20 --warmup=3 --check --impls=plain,dense,fused,blockwise,pallas,cudnn --token_list=197,1025,4097
    ;;
  esac
done
