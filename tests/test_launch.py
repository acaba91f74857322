"""Launch scripts: a real 2-process job through local_multiprocess.sh; the TPU and SLURM scripts'
commands from their dry runs, and the shell they run on the TPU hosts, executed in a fake home."""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import locatvit_jax
from tests.conftest import REPO

LOCAL = REPO / 'launch' / 'local_multiprocess.sh'
TPU = REPO / 'launch' / 'tpu_vm.sh'
SLURM = REPO / 'launch' / 'slurm_gpu.sbatch'
JAX_PIN = re.search(r'^jax==(\S+)$', (REPO / 'requirements.txt').read_text(), re.M).group(1)


def sh(script, *args, env=None, timeout=60, **kw):
  return subprocess.run(['bash', str(script), *map(str, args)], env=dict(os.environ, **(env or {})),
                        capture_output=True, text=True, timeout=timeout, **kw)


def dry_run(out):
  """The commands a dry run printed, as argv lists."""
  assert out.returncode == 0, out.stderr
  return [shlex.split(l.removeprefix('DRY-RUN: ')) for l in out.stdout.splitlines() if l.startswith('DRY-RUN: ')]


def stub(path: pathlib.Path, body: str) -> pathlib.Path:
  """An executable bash script standing in for a program (python, srun); `$id` is its --process_id."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('#!/bin/bash\nfor a; do case $a in --process_id=*) id=${a#*=};; esac; done\n' + body)
  path.chmod(0o755)
  return path


# -- local_multiprocess.sh -------------------------------------------------------------------------
def test_local_two_processes_train_and_checkpoint(tmp_path, image_folder):
  from tests.conftest import TINY_MODEL_FLAGS
  workdir = tmp_path / 'workdir'
  main_args = ['--config=configs/vit_ti.py', f'--workdir={workdir}', *TINY_MODEL_FLAGS,
               '--config.data.kind=folder', f'--config.data.root={image_folder}', '--config.data.eval_split=val',
               '--config.data.num_classes=4', '--config.mesh.data=2', '--config.mesh.fsdp=4',
               '--config.total_steps=4', '--config.warmup_steps=2', '--config.checkpoint_every=2']
  env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROCESS='4')
  env.pop('XLA_FLAGS', None)  # conftest's 8 devices; the script gives each process 4
  env.pop('JAX_PLATFORMS', None)
  # From outside the repo: the script puts it on PYTHONPATH.
  out = subprocess.run(['bash', str(LOCAL), '2', '--', *main_args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert all(l.startswith(('[p0] ', '[p1] ')) for l in lines)
  assert any(l.startswith('[p0] ') for l in lines) and any(l.startswith('[p1] ') for l in lines)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert len(list((workdir / 'checkpoints' / '4' / 'data_iter').glob('process_*-of-2.json'))) == 2
  model = locatvit_jax.load(workdir)
  assert np.isfinite(np.asarray(model(np.zeros((1, 32, 32, 3), np.float32)))).all()


def test_local_failure_kills_the_others(tmp_path):
  # Process 0 would run for a minute, through a child that holds its output open like a data-loader
  # worker: the kill must reach the child too, or the launcher would wait for it.
  python = stub(tmp_path / 'python', '[ "$id" = 1 ] && { echo "failing on purpose"; exit 3; }\n'
                'sleep 60 & wait\n')
  t0 = time.time()
  out = sh(LOCAL, 2, '--', '--config=x', env=dict(PYTHON=str(python), PORT='12345'), timeout=30)
  assert time.time() - t0 < 20
  assert out.returncode == 3
  assert '[p1] failing on purpose' in out.stdout.splitlines()
  assert 'process 1 exited with 3; killing the others' in out.stderr


def test_local_sigterm_reaches_every_process(tmp_path):
  python = stub(tmp_path / 'python', f'trap \'kill $!; echo "TERM in $id"; exit 143\' TERM\n'
                f'sleep 60 & touch {tmp_path}/ready.$id; wait\n')
  proc = subprocess.Popen(['bash', str(LOCAL), '2', '--'], env=dict(os.environ, PYTHON=str(python), PORT='12345'),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 20
  while not all((tmp_path / f'ready.{i}').exists() for i in range(2)):
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=20)
  assert proc.returncode == 143  # the processes' own status: they stopped on the signal
  assert sorted(stdout.splitlines()) == ['[p0] TERM in 0', '[p1] TERM in 1']


def test_local_dry_run_commands():
  # No CPU flags or allocator here: each locatvit_jax.main applies locatvit_jax/cpu_env.py itself
  # (tests/test_cpu_env.py), so the launcher cannot disagree with it.
  env = dict(PYTHON='py', PORT='12345', DEVICES_PER_PROCESS='4', XLA_FLAGS='--xla_dump_to=/tmp/x',
             PYTHONPATH='/elsewhere')
  commands = dry_run(sh(LOCAL, '--dry-run', 3, '--', '--config=configs/vit_ti.py', '--workdir=/tmp/w x', env=env))
  assert commands == [
      ['env', 'XLA_FLAGS=--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4',
       f'PYTHONPATH={REPO}:/elsewhere', 'PYTHONUNBUFFERED=1',
       'py', '-m', 'locatvit_jax.main', '--config=configs/vit_ti.py', '--workdir=/tmp/w x',
       '--coordinator_address=127.0.0.1:12345', '--num_processes=3', f'--process_id={i}']
      for i in range(3)]


@pytest.mark.parametrize('args, env, message', [
    (['0', '--'], {}, "N='0' is not a positive number of processes"),
    (['two', '--'], {}, "N='two'"),
    (['2', '--config=x'], {}, 'usage: launch/local_multiprocess.sh'),
    (['2', '--'], dict(DEVICES_PER_PROCESS='4x'), "DEVICES_PER_PROCESS='4x' is not a positive integer"),
    (['2', '--'], dict(PORT='70000'), "PORT='70000' is not a TCP port"),
])
def test_local_bad_input(args, env, message):
  out = sh(LOCAL, '--dry-run', *args, env=env)
  assert out.returncode != 0 and message in out.stderr and not out.stdout


# -- tpu_vm.sh -------------------------------------------------------------------------------------
GCLOUD = ['gcloud', 'compute', 'tpus', 'tpu-vm']
WHERE = ['--zone=us-central2-b', '--project=proj']
TPU_ARGS = ['--dry-run', '--name=lat', '--zone=us-central2-b', '--project=proj', '--type=v4-32']


def test_tpu_create_reuses_or_creates():
  commands = dry_run(sh(TPU, 'create', *TPU_ARGS, '--', '--spot'))
  assert commands == [
      [*GCLOUD, 'describe', 'lat', *WHERE],
      [*GCLOUD, 'create', 'lat', *WHERE, '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--spot']]


def test_tpu_setup_ships_checkout_and_installs_pinned_jax_tpu(tmp_path):
  out = sh(TPU, 'setup', *TPU_ARGS, env=dict(TMPDIR=str(tmp_path)))
  pack, scp, ssh = dry_run(out)
  tarball = scp[5]
  assert tarball.startswith(f'{tmp_path}/')
  assert scp == [*GCLOUD, 'scp', tarball, 'lat:locatvit_jax.tar.gz', *WHERE, '--worker=all']
  assert ssh[:-1] == [*GCLOUD, 'ssh', 'lat', *WHERE, '--worker=all']
  remote = ssh[-1].removeprefix('--command=')
  assert (f".venv/bin/pip install -q -r requirements.txt 'jax[tpu]=={JAX_PIN}' "
          '-f https://storage.googleapis.com/jax-releases/libtpu_releases.html') in remote
  assert 'python3.11 -m venv .venv' in remote and 'tar -xzf ~/locatvit_jax.tar.gz' in remote
  # The packing command, run for real: the code and pins go, the venv and caches stay behind.
  subprocess.run(['bash', '-o', 'pipefail', '-c', shlex.join(pack).replace("'|'", '|')], check=True, timeout=60)
  names = subprocess.run(['tar', '-tzf', tarball], capture_output=True, text=True, check=True).stdout.split()
  assert {'requirements.txt', 'locatvit_jax/main.py', 'locatvit_jax/configs/vit_b.py', 'launch/tpu_vm.sh'} <= set(names)
  assert not [n for n in names if n.startswith(('.venv/', '.git/')) or '__pycache__' in n]


def test_tpu_run_and_stop_on_every_host(tmp_path):
  run = dry_run(sh(TPU, 'run', *TPU_ARGS, '--config=configs/vit_b.py', '--workdir=gs://bucket/b16',
                   '--data-dir=/mnt/tfds', '--', '--config.batch_size=2048', '--config.note=a b'))
  stop = dry_run(sh(TPU, 'stop', *TPU_ARGS))
  assert [c[:-1] for c in run + stop] == [[*GCLOUD, 'ssh', 'lat', *WHERE, '--worker=all']] * 2
  # What each host runs, executed here in a fake home with a stand-in for the venv's python.
  home = tmp_path / 'home'
  stub(home / 'locatvit_jax' / '.venv' / 'bin' / 'python',
       # Written aside, then renamed: the test polls for ~/argv and must never read it half-written.
       'printf "%s\\n" "$@" >~/argv.part && mv ~/argv.part ~/argv; trap \'kill $!; echo "checkpointed"; exit 143\' TERM; sleep 60 & wait\n')
  on_host = lambda command: subprocess.run(['bash', '-c', command[-1].removeprefix('--command=')],
                                           env=dict(os.environ, HOME=str(home)), capture_output=True,
                                           text=True, timeout=30)
  assert on_host(run[0]).returncode == 0
  deadline = time.time() + 10
  while not (home / 'argv').exists():
    assert time.time() < deadline
    time.sleep(0.05)
  assert (home / 'argv').read_text().splitlines() == [
      '-m', 'locatvit_jax.main', '--config=configs/vit_b.py', '--workdir=gs://bucket/b16',
      '--config.data.data_dir=/mnt/tfds', '--config.batch_size=2048', '--config.note=a b']
  again = on_host(run[0])
  assert again.returncode == 1 and 'a run is still going' in again.stderr
  stopped = on_host(stop[0])  # returns once the run has exited
  assert stopped.returncode == 0 and stopped.stdout.endswith('stopped\n')
  assert 'checkpointed' in (home / 'locatvit_jax.log').read_text()
  assert 'no run' in on_host(stop[0]).stdout


def test_tpu_logs_and_delete():
  assert dry_run(sh(TPU, 'logs', *TPU_ARGS, '--worker=3')) == [
      [*GCLOUD, 'ssh', 'lat', *WHERE, '--worker=3', '--command=tail -n 200 -F ~/locatvit_jax.log']]
  assert dry_run(sh(TPU, 'delete', *TPU_ARGS)) == [[*GCLOUD, 'delete', 'lat', *WHERE]]


@pytest.mark.parametrize('args, message', [
    (['launch', '--name=a', '--zone=z'], "unknown subcommand 'launch'"),
    (['run', '--zone=z', '--config=c', '--workdir=gs://b/w'], 'run needs --name (or TPU_NAME)'),
    (['run', '--name=a', '--zone=z', '--config=c'], 'run needs --workdir (or WORKDIR)'),
    (['run', '--name=a', '--zone=z', '--config=c', '--type=v4-32', '--workdir=/data/w'],
     "--workdir='/data/w' must be gs:// on the multi-host slice v4-32"),
    (['run', '--name=a', '--zone=z', '--config=c', '--workdir=/data/w'], "--workdir='/data/w' is not gs://"),
    (['create', '--name=a', '--zone=z'], 'create needs --type (or TPU_TYPE)'),
    (['create', '--name=a', '--zone=z', '--type=v4_32'], "--type='v4_32' is not an accelerator type"),
    (['create', '--name=a', '--zone=z', '--type=v4-8', '--size=2'], "unknown option '--size=2'"),
    (['stop', '--name=a', '--zone=z', '--', '--config.x=1'], "stop takes no args after --, got '--config.x=1'"),
])
def test_tpu_bad_input(args, message):
  out = sh(TPU, args[0], '--dry-run', *args[1:], env=dict(TPU_NAME='', TPU_ZONE='', TPU_TYPE='', WORKDIR='', CONFIG=''))
  assert out.returncode != 0 and message in out.stderr and not out.stdout


def test_tpu_single_host_may_use_a_local_workdir():
  (command,) = dry_run(sh(TPU, 'run', '--dry-run', '--name=a', '--zone=z', '--type=v4-8',
                          '--config=configs/vit_ti.py', '--workdir=/data/w'))
  assert "'--workdir=/data/w'" in command[-1]


# -- slurm_gpu.sbatch ------------------------------------------------------------------------------
@pytest.fixture
def slurm_env(tmp_path):
  (tmp_path / 'venv' / 'bin').mkdir(parents=True)
  (tmp_path / 'venv' / 'bin' / 'activate').touch()
  return dict(DRY_RUN='1', VENV=str(tmp_path / 'venv'), SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID='4242',
              SLURM_JOB_NODELIST='gpu[01-04]', SLURM_GPUS_ON_NODE='8', SLURM_CPUS_ON_NODE='96',
              CONFIG='configs/vit_b.py', WORKDIR='/shared/runs/b16', EXTRA='--config.seed=1 --config.epochs=3',
              XLA_PYTHON_CLIENT_MEM_FRACTION='', REPO='')


def test_slurm_srun_command(slurm_env):
  commands = dry_run(sh(SLURM, '--config.note=a b', env=slurm_env, cwd='/'))
  assert commands == [
      ['source', f'{slurm_env["VENV"]}/bin/activate'],
      ['export', 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9'],
      ['srun', '--ntasks-per-node=1', '--cpus-per-task=96', '--kill-on-bad-exit=1', 'python', '-m',
       'locatvit_jax.main', '--config=configs/vit_b.py', '--workdir=/shared/runs/b16', '--config.seed=1',
       '--config.epochs=3', '--config.note=a b']]


def test_slurm_runs_srun_in_the_venv_with_all_gpus_visible(slurm_env, tmp_path):
  # Not a dry run: a stand-in srun on PATH shows what the real one would receive.
  bin_dir = tmp_path / 'bin'
  stub(bin_dir / 'srun', 'echo "$VIRTUAL_ENV|$JAX_LOCAL_DEVICE_IDS|$XLA_PYTHON_CLIENT_MEM_FRACTION|$*"\n')
  (tmp_path / 'venv' / 'bin' / 'activate').write_text('export VIRTUAL_ENV=the_venv\n')
  env = {**slurm_env, 'DRY_RUN': '0', 'SLURM_GPUS_ON_NODE': '4', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.8',
         'PATH': f'{bin_dir}:{os.environ["PATH"]}'}
  out = sh(SLURM, env=env, cwd='/')
  assert out.returncode == 0, out.stderr
  assert out.stdout == ('the_venv|0,1,2,3|0.8|--ntasks-per-node=1 --cpus-per-task=96 --kill-on-bad-exit=1 python -m '
                        'locatvit_jax.main --config=configs/vit_b.py --workdir=/shared/runs/b16 --config.seed=1 '
                        '--config.epochs=3\n')


@pytest.mark.parametrize('override, message', [
    (dict(CONFIG=''), 'CONFIG is not set'),
    (dict(WORKDIR=''), 'WORKDIR is not set'),
    (dict(SLURM_JOB_ID=''), 'not inside a SLURM job'),
    (dict(SLURM_GPUS_ON_NODE=''), "SLURM_GPUS_ON_NODE='': the job has no GPUs"),
    (dict(VENV='/nonexistent'), "VENV='/nonexistent' has no bin/activate"),
    (dict(SLURM_SUBMIT_DIR='/'), "REPO='/' is not a locatvit_jax checkout"),
])
def test_slurm_bad_input(slurm_env, override, message):
  out = sh(SLURM, env={**slurm_env, **override}, cwd='/')
  assert out.returncode != 0 and message in out.stderr and not out.stdout
