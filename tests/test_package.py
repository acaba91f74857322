"""The installable package: metadata that tells the truth, a wheel that runs outside the checkout.

The wheel is built offline from pyproject.toml and installed into a new virtual environment whose
only other packages are this test environment's (a .pth file points at them), so the package
itself, its console scripts and its bundled configs are what is tested, from a folder that holds
no checkout.
"""

import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.conftest import REPO, make_image_folder

PYPROJECT = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']


def _pins() -> dict[str, str]:
  pins = {}
  for line in (REPO / 'requirements.txt').read_text().splitlines():
    line = line.split('#')[0].strip()
    if line:
      req = Requirement(line)
      pins[req.name.lower()] = next(iter(req.specifier)).version
  return pins


def test_requires_python_is_true_and_the_lock_satisfies_every_range():
  assert SpecifierSet(PYPROJECT['requires-python']).contains('.'.join(map(str, sys.version_info[:3])))
  assert not SpecifierSet(PYPROJECT['requires-python']).contains('3.10.14')  # the pins need 3.11
  pins = _pins()
  ranges = [Requirement(r) for r in PYPROJECT['dependencies']]
  ranges += [Requirement(r) for extra in ('demo', 'test') for r in PYPROJECT['optional-dependencies'][extra]]
  for req in ranges:
    assert req.name.lower() in pins, f'{req.name} has a range but no tested pin in requirements.txt'
    assert req.specifier.contains(pins[req.name.lower()]), f'{req.name}=={pins[req.name.lower()]} not in {req}'
  assert set(PYPROJECT['optional-dependencies']) >= {'tpu', 'cuda12', 'demo', 'test'}


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> pathlib.Path:
  """bin/ of a new venv with the wheel installed (no editable install, no checkout on its path)."""
  root = tmp_path_factory.mktemp('package')
  # Built from a copy of what the package is made of: setuptools writes build/ into the source tree.
  source = root / 'source'
  source.mkdir()
  for name in ('pyproject.toml', 'README.md', 'LICENSE'):
    shutil.copy(REPO / name, source / name)
  shutil.copytree(REPO / 'locatvit_jax', source / 'locatvit_jax', ignore=shutil.ignore_patterns('__pycache__'))
  wheels = root / 'wheels'
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                  '-w', str(wheels), str(source)], check=True, capture_output=True, text=True, timeout=600)
  (wheel,) = wheels.glob('locatvit_jax-*.whl')
  venv = root / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
  python = venv / 'bin' / 'python'
  site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        check=True, capture_output=True, text=True).stdout.strip()
  (pathlib.Path(site) / 'deps.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
  subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '-q', '--no-deps',
                  '--no-index', str(wheel)], check=True, capture_output=True, text=True, timeout=600)
  return venv / 'bin'


def _run(cmd, cwd, timeout=300):
  env = {'PATH': '/usr/bin:/bin', 'HOME': str(cwd), 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  return subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_console_scripts_help_outside_the_checkout(installed, tmp_path):
  where = _run([installed / 'python', '-c', 'import locatvit_jax; print(locatvit_jax.__file__)'], tmp_path)
  assert where.stdout.startswith(str(installed.parent)), where.stdout + where.stderr
  train = _run([installed / 'locatvit-train', '--help'], tmp_path)
  assert train.returncode == 0 and '--workdir' in train.stdout + train.stderr, train.stderr[-2000:]
  convert = _run([installed / 'locatvit-convert', '--help'], tmp_path)
  assert convert.returncode == 0 and '--to-timm' in convert.stdout, convert.stderr[-2000:]
  predict = _run([installed / 'locatvit-predict', '--help'], tmp_path)
  assert predict.returncode == 0 and '--init' in predict.stdout, predict.stderr[-2000:]


def test_packaged_configs_train_outside_the_checkout(installed, tmp_path):
  """`--config=configs/vit_ti.py` names the installed package's config when no such file is here."""
  make_image_folder(tmp_path / 'data')
  out = _run([installed / 'locatvit-train', '--config=configs/vit_ti.py:vit', f'--workdir={tmp_path / "w"}',
              '--config.model.img_size=32', '--config.model.width=32', '--config.model.depth=1',
              '--config.model.num_heads=2', '--config.model.mlp_dim=64', '--config.aug.eval_resize=36',
              '--config.input.worker_count=0', '--config.batch_size=8', '--config.eval_batch_size=8',
              '--config.data.kind=folder', f'--config.data.root={tmp_path / "data"}',
              '--config.data.num_classes=4', '--config.total_steps=2', '--config.warmup_steps=1'], tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Final metrics: {' in out.stdout and '"eval_top1"' in out.stdout
  assert (tmp_path / 'w' / 'export' / 'model_config.json').exists()
