#!/usr/bin/env bash
# One multi-process JAX job on this machine: N processes of locatvit_jax.main find each other over
# loopback, as the hosts of a pod slice do over the network. It exercises the multi-host code
# (per-process data shards, sharded checkpoints, collective preemption) without a cluster.
#
#   launch/local_multiprocess.sh [--dry-run] N -- --config=configs/vit_ti.py --workdir=/tmp/w ...
#
# Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 1); appended to any XLA_FLAGS.
#   PORT                 coordinator port (default: a free one).
#   PYTHON               interpreter (default: python, e.g. the activated venv's).
#   LOCATVIT_FAST_CPU=0  keep the processes out of the fast CPU environment (see below).
# Output lines are prefixed [p0], [p1], ... If one process fails the others are killed (they would
# wait forever in collectives); the exit status is the first failure's. SIGINT/SIGTERM are passed
# on to every process, which then checkpoint together and exit, as on a preempted pod.
set -euo pipefail

die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }
usage='usage: launch/local_multiprocess.sh [--dry-run] N -- <locatvit_jax.main args>'

# `wait -n -p` (bash 5.1) tells which process ended first.
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || die "needs bash >= 5.1, this is $BASH_VERSION"

dry_run=0
if [[ "${1:-}" == --dry-run ]]; then dry_run=1; shift; fi
(($# >= 2)) && [[ "$2" == -- ]] || die "$usage"
num=$1
shift 2
[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "N='$num' is not a positive number of processes; $usage"
devices=${DEVICES_PER_PROCESS:-1}
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS='$devices' is not a positive integer"
python=${PYTHON:-python}

if [[ -n "${PORT:-}" ]]; then
  [[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || die "PORT='$PORT' is not a TCP port"
  port=$PORT
else  # The OS hands out a free port; the coordinator binds it a moment later.
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# The repo on PYTHONPATH: `-m locatvit_jax.main` works from a clone that was not pip-installed, from
# any directory, while relative --workdir/--config paths keep meaning the caller's directory.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The fast CPU environment (XLA flags; mimalloc or glibc malloc tunables) is not set here: each
# locatvit_jax.main process re-executes itself under it (locatvit_jax/cpu_env.py, the one place
# for it), keeping its pid, so the waits and signals below still reach it.
env_vars=(
  "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
  "PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}"
  PYTHONUNBUFFERED=1  # lines reach the prefixer as they are printed
)

main_args=("$@")
command_for() {  # sets `cmd` to the argv of process $1
  cmd=(env "${env_vars[@]}" "$python" -m locatvit_jax.main "${main_args[@]}"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num" "--process_id=$1")
}

if ((dry_run)); then
  for ((i = 0; i < num; i++)); do
    command_for "$i"
    echo "DRY-RUN: ${cmd[*]@Q}"
  done
  exit 0
fi

# Each process writes into its own FIFO, read by a sed that prefixes its lines. Both pids are
# children of this shell: signals go to the Python processes only (a dying sed would take its
# process down with SIGPIPE), and we wait for every sed so no last line is lost. Job control puts
# each process in its own process group, so a kill also reaches its data-loader workers, which
# would otherwise hold the FIFO open.
set -m
fifos=$(mktemp -d)
trap 'rm -rf "$fifos"' EXIT
declare -A index  # pid -> process id
seds=()
for ((i = 0; i < num; i++)); do
  mkfifo "$fifos/p$i"
  sed -u "s/^/[p$i] /" <"$fifos/p$i" &
  seds+=($!)
  command_for "$i"
  "${cmd[@]}" >"$fifos/p$i" 2>&1 &
  index[$!]=$i
done

kill_groups() { local pid; for pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done; }

# First signal: SIGTERM to all, so they finish the step, checkpoint together and exit. Second: kill.
stopping=0
on_signal() {
  if ((stopping)); then kill_groups "${!index[@]}"; fi
  stopping=1
  kill -TERM "${!index[@]}" 2>/dev/null || true
}
trap on_signal TERM INT

first_failure=0
running=("${!index[@]}")
while ((${#running[@]})); do
  status=0
  wait -n -p finished "${running[@]}" || status=$?
  [[ -n "${finished:-}" ]] || continue  # a trapped signal interrupted the wait
  left=()
  for pid in "${running[@]}"; do [[ "$pid" == "$finished" ]] || left+=("$pid"); done
  running=("${left[@]}")
  if ((status != 0 && first_failure == 0)); then
    first_failure=$status
    # The others would block in their next collective; unless they are already stopping on a
    # signal, nothing they could still do is worth waiting for (checkpoints commit atomically).
    if ((!stopping)); then
      echo "local_multiprocess.sh: process ${index[$finished]} exited with $status; killing the others" >&2
      kill_groups "${running[@]}"
    fi
  fi
done
wait "${seds[@]}"
exit "$first_failure"
