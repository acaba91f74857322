"""Anyone's clone runs pytest: without ../shared the parity tests skip with a note; CI fails instead."""

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO


def _pytest_in_a_clone_without_shared(tmp_path, ci: bool):
  clone = tmp_path / 'clone'  # no ../shared beside it
  (clone / 'tests').mkdir(parents=True)
  shutil.copy(REPO / 'tests' / 'conftest.py', clone / 'tests' / 'conftest.py')
  (clone / 'tests' / 'test_uses_parity.py').write_text(
      'def test_parity(parity_dir):\n  assert parity_dir.is_dir()\n\n\ndef test_other():\n  pass\n')
  env = {k: v for k, v in os.environ.items() if k != 'CI'}
  if ci:
    env['CI'] = 'true'
  return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', 'tests'],
                        cwd=clone, env=env, capture_output=True, text=True, timeout=300)


def test_without_shared_parity_tests_skip_with_a_note(tmp_path):
  out = _pytest_in_a_clone_without_shared(tmp_path, ci=False)
  assert out.returncode == 0, out.stdout[-2000:]
  assert '1 passed, 1 skipped' in out.stdout
  assert 'the parity tests need ../shared beside the checkout' in out.stdout


def test_ci_without_shared_fails_rather_than_skipping(tmp_path):
  out = _pytest_in_a_clone_without_shared(tmp_path, ci=True)
  assert out.returncode == 1 and '1 passed, 1 error' in out.stdout, out.stdout[-2000:]
  assert 'the parity tests need ../shared beside the checkout' in out.stdout
