"""launch/colab_demo.ipynb runs top to bottom on CPU: tiny sizes, two devices, nothing installed."""

import pathlib
import re
import subprocess

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'launch' / 'colab_demo.ipynb'


def test_committed_notebook_is_valid_and_cleared():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_pretrains_draws_shards_and_segments(tmp_path, monkeypatch):
  # The kernel inherits this environment: the notebook's test switches and two CPU devices.
  monkeypatch.setenv('LOCATVIT_NOTEBOOK_TEST', '1')
  monkeypatch.setenv('LOCATVIT_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  (tmp_path / 'locatvit_jax').symlink_to(REPO)  # where a Colab user clones it, next to the notebook
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()  # raises on any error

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream' and o.name == 'stdout')
  assert 'nothing installed' in text
  assert 'devices: 2' in text
  assert '(+2,340)' in text  # GAug's parameters in a 12-block model
  assert re.search(r'Pretrained: loss \d+\.\d{4}, validation top-1 \d+\.\d\d%', text)
  assert [int(s) for s in re.findall(r'sharded step (\d+): loss \d+\.\d{4}', text)] == [1, 2, 3]
  assert "'fsdp': 2" in text
  assert "qkv/kernel (32, 96): P('fsdp', 'tensor')" in text  # FSDP really shards the parameters
  assert re.search(r'Segmentation: mIoU \d+\.\d\d%', text)

  workdir = tmp_path / 'locatvit_demo'
  pictures = ['gaug_kernels.png', 'attention.png', 'segment/segmentation_step4.png']
  for name in pictures:
    assert (workdir / name).read_bytes().startswith(b'\x89PNG'), name
  assert sum('image/png' in o.get('data', {}) for o in outputs) == len(pictures)


def test_install_cell_clones_repo_url_and_resolves_the_package_with_its_extras(tmp_path, monkeypatch):
  """The Parameters and Install cells alone, in a folder with no checkout: they clone REPO_URL and
  hand pip the package with this runtime's extras (a dry run here: nothing is installed)."""
  subprocess.run(['git', 'clone', '-q', str(REPO), str(tmp_path / 'origin')], check=True, timeout=120)
  monkeypatch.setenv('LOCATVIT_NOTEBOOK_TEST', '1')
  monkeypatch.setenv('LOCATVIT_REPO_URL', str(tmp_path / 'origin'))
  (tmp_path / 'colab').mkdir()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  parameters, install = (next(c for c in nb.cells if c.cell_type == 'code' and marker in c.source)
                         for marker in ('REPO_URL =', 'def find_or_clone_repository'))
  nb.cells = [parameters, install]
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path / 'colab')}}).execute()
  text = ''.join(o.get('text', '') for o in install.outputs if o.output_type == 'stream')
  assert (tmp_path / 'colab' / 'locatvit_jax' / 'pyproject.toml').exists()  # cloned next to the notebook
  assert f"{tmp_path / 'colab' / 'locatvit_jax'}[demo]" in text  # CPU runtime: no accelerator extra
  assert 'Would install locatvit_jax-' in text
