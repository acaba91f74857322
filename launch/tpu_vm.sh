#!/usr/bin/env bash
# Cloud TPU VMs and pod slices from your workstation: create one, copy this checkout and install it
# on every host, start training on every host, read logs, stop, delete.
#
#   launch/tpu_vm.sh SUBCOMMAND [--dry-run] [--option=value ...] [-- extra args]
#
#   create   create the TPU VM (reused if it exists); args after -- go to `gcloud ... create`
#            (e.g. -- --spot).
#   setup    copy the checkout (files git tracks or would track, so no .venv, no workdirs) to
#            ~/locatvit_jax on every host, make a venv, install requirements.txt + jax[tpu].
#   run      start `python -m locatvit_jax.main` on every host in the background (nohup; log in
#            ~/locatvit_jax.log on each host); args after -- go to main (e.g. --config.batch_size=2048).
#   logs     follow the log of one host (--worker, default 0; `all` prints every host's).
#   stop     SIGTERM the run on every host: it checkpoints and exits; rerun `run` to resume.
#   delete   delete the TPU VM.
#
# Options (or environment): --name (TPU_NAME), --zone (TPU_ZONE), --type (TPU_TYPE, e.g. v4-32),
# --version (TPU_VERSION, default tpu-ubuntu2204-base), --project (TPU_PROJECT, else gcloud's
# default), --config (CONFIG), --workdir (WORKDIR; gs:// on a pod: every host must see the same
# checkpoints), --data-dir (DATA_DIR: TFDS data dir on the hosts, e.g. a gcsfuse mount),
# --worker (WORKER, for logs). --dry-run prints every command, one per line after "DRY-RUN: ", and
# runs nothing. See launch/README.md.
set -euo pipefail

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote_dir=locatvit_jax  # in the home directory of every host
remote_python=python3.11  # the pins need Python >= 3.11; Ubuntu 22.04 images ship 3.10
libtpu_url=https://storage.googleapis.com/jax-releases/libtpu_releases.html

(($#)) || die 'usage: launch/tpu_vm.sh {create|setup|run|logs|stop|delete} [--option=value ...] [-- args]'
subcommand=$1
shift
case "$subcommand" in
  create | setup | run | logs | stop | delete) ;;
  *) die "unknown subcommand '$subcommand'; expected create, setup, run, logs, stop or delete" ;;
esac

name=${TPU_NAME:-} zone=${TPU_ZONE:-} type=${TPU_TYPE:-} version=${TPU_VERSION:-tpu-ubuntu2204-base}
project=${TPU_PROJECT:-} config=${CONFIG:-} workdir=${WORKDIR:-} data_dir=${DATA_DIR:-}
worker=${WORKER:-0} dry_run=0 extra=()
while (($#)); do
  case "$1" in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --type=*) type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --data-dir=*) data_dir=${1#*=} ;;
    --worker=*) worker=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (options are --name=, --zone=, --type=, --version=, --project=, --config=, --workdir=, --data-dir=, --worker=, --dry-run; args for main go after --)" ;;
  esac
  shift
done

require() {  # require VALUE OPTION ENV_VAR
  [[ -n "$1" ]] || die "$subcommand needs --$2 (or $3)"
}
require "$name" name TPU_NAME
require "$zone" zone TPU_ZONE
if [[ -n "$type" ]]; then
  [[ "$type" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] || die "--type='$type' is not an accelerator type like v4-8 or v5p-64"
fi
if ((${#extra[@]})) && [[ "$subcommand" != create && "$subcommand" != run ]]; then
  die "$subcommand takes no args after --, got '${extra[*]}'"
fi

run() {  # runs a command, or prints it in a form the shell (and shlex) reads back
  if ((dry_run)); then echo "DRY-RUN: ${*@Q}"; else "$@"; fi
}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
if [[ -n "$project" ]]; then where+=(--project="$project"); fi
on_all_hosts() {  # runs shell command $1 on every host of the slice
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"
}

case "$subcommand" in
  create)
    require "$type" type TPU_TYPE
    if ((dry_run)); then
      run "${gcloud_tpu[@]}" describe "$name" "${where[@]}"
    elif "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
      echo "tpu_vm.sh: $name exists in $zone; reusing it"
      exit 0
    fi
    run "${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version" \
        "${extra[@]}"
    ;;

  setup)
    jax_version=$(sed -nE 's/^jax==([^[:space:]]+).*/\1/p' "$repo/requirements.txt")
    [[ -n "$jax_version" ]] || die "no 'jax==VERSION' line in $repo/requirements.txt"
    tarball=${TMPDIR:-/tmp}/locatvit_jax_setup.$$.tar.gz
    trap 'rm -f "$tarball"' EXIT
    # One archive per host instead of thousands of scp round trips; git's file list carries the
    # .gitignore rules (.venv, workdirs, caches stay behind) and includes uncommitted edits.
    pack="git -C ${repo@Q} ls-files -z --cached --others --exclude-standard | tar -C ${repo@Q} --null --ignore-failed-read -T - -czf ${tarball@Q}"
    if ((dry_run)); then echo "DRY-RUN: $pack"; else bash -o pipefail -c "$pack"; fi
    run "${gcloud_tpu[@]}" scp "$tarball" "$name:$remote_dir.tar.gz" "${where[@]}" --worker=all
    # Unpacked over a wiped tree (stale files go, the venv stays). The dpkg lock timeout waits for
    # the unattended upgrades that hold the lock right after a VM boots.
    on_all_hosts "set -euo pipefail; mkdir -p ~/$remote_dir; cd ~/$remote_dir; \
find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; \
tar -xzf ~/$remote_dir.tar.gz; rm ~/$remote_dir.tar.gz; \
sudo apt-get -o DPkg::Lock::Timeout=600 -qq update; \
sudo apt-get -o DPkg::Lock::Timeout=600 -qq install -y $remote_python-venv; \
[ -x .venv/bin/python ] || $remote_python -m venv .venv; \
.venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$jax_version' -f $libtpu_url"
    ;;

  run)
    require "$config" config CONFIG
    require "$workdir" workdir WORKDIR
    if [[ "$workdir" != gs://* ]]; then  # a host's own disk: right for a single host only
      [[ -n "$type" ]] || die "--workdir='$workdir' is not gs://: pass --type (or TPU_TYPE) to show the TPU is a single host"
      # More than 8 chips (cores on v2/v3) is more than one host.
      ((${type##*-} <= 8)) || die "--workdir='$workdir' must be gs:// on the multi-host slice $type: every host reads and writes the same checkpoints"
    fi
    main=(.venv/bin/python -m locatvit_jax.main --config="$config" --workdir="$workdir")
    if [[ -n "$data_dir" ]]; then main+=(--config.data.data_dir="$data_dir"); fi
    main+=("${extra[@]}")
    # One run at a time: the TPU chips belong to one process per host.
    on_all_hosts "set -e; cd ~/$remote_dir; \
[ -x .venv/bin/python ] || { echo \"\$(hostname): no venv in ~/$remote_dir; run setup first\" >&2; exit 1; }; \
if [ -f ~/locatvit_jax.pid ] && kill -0 \$(cat ~/locatvit_jax.pid) 2>/dev/null; then \
echo \"\$(hostname): a run is still going (pid \$(cat ~/locatvit_jax.pid)); use stop first\" >&2; exit 1; fi; \
nohup ${main[*]@Q} >~/locatvit_jax.log 2>&1 </dev/null & echo \$! >~/locatvit_jax.pid"
    ;;

  logs)
    [[ "$worker" == all || "$worker" =~ ^[0-9]+$ ]] || die "--worker='$worker' is not a host number or 'all'"
    if [[ "$worker" == all ]]; then
      command='echo "== $(hostname)"; tail -n 20 ~/locatvit_jax.log'
    else
      command='tail -n 200 -F ~/locatvit_jax.log'
    fi
    run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker="$worker" --command="$command"
    ;;

  stop)
    # SIGTERM on every host at once: the trainer finishes its step, all hosts save one checkpoint
    # together, and exit; wait for that so a `delete` right after loses nothing.
    on_all_hosts 'pid=$(cat ~/locatvit_jax.pid 2>/dev/null) && kill -TERM "$pid" 2>/dev/null '\
'|| { echo "$(hostname): no run"; exit 0; }; while kill -0 "$pid" 2>/dev/null; do sleep 1; done; '\
'echo "$(hostname): stopped"'
    ;;

  delete)
    run "${gcloud_tpu[@]}" delete "$name" "${where[@]}"
    ;;
esac
