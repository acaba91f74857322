"""The entry point on bad settings and inputs: one clear error, and nothing written in the workdir."""

import re
import types

import pytest

from locatvit_jax import convert, paths
from locatvit_jax import main as entry
from locatvit_jax.configs import demo as demo_config
from locatvit_jax.train import common
from tests import test_loading
from tests.conftest import tiny_classification_config


def test_unknown_task_is_one_error_line_and_exit_status_2(tmp_path, monkeypatch, capsys):
  config = tiny_classification_config(task='clasification')
  monkeypatch.setattr(entry, '_CONFIG', types.SimpleNamespace(value=config))
  monkeypatch.setattr(entry, '_WORKDIR', types.SimpleNamespace(value=str(tmp_path / 'w')))
  monkeypatch.setattr(entry, 'initialize_distributed', lambda: None)
  with pytest.raises(SystemExit) as info:
    entry.main(['locatvit-train'])
  assert info.value.code == 2
  out = capsys.readouterr()
  assert out.err == f"error: config.task='clasification'; expected one of {entry.TASKS}\n" and out.out == ''
  assert {'classification', 'segmentation', 'demo', 'evaluate'} <= set(entry.TASKS)
  assert not (tmp_path / 'w').exists()


def test_diverged_run_is_one_error_line_and_exit_status_1(tmp_path, monkeypatch, capsys):
  def diverge(config, workdir):
    common.check_finite({'loss': float('nan')}, 7)
  monkeypatch.setattr(entry, 'run', diverge)
  monkeypatch.setattr(entry, '_CONFIG', types.SimpleNamespace(value=None))
  monkeypatch.setattr(entry, '_WORKDIR', types.SimpleNamespace(value=str(tmp_path)))
  monkeypatch.setattr(entry, 'initialize_distributed', lambda: None)
  with pytest.raises(SystemExit) as info:
    entry.main(['locatvit-train'])
  assert info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith('error: loss is nan at step 7: stopping; the last good checkpoint is kept.')
  assert err.count('\n') == 1


@pytest.mark.parametrize('mode, setting, message', [
    ('single', 'variant', "config.variant: unknown demo variant 'vitt'"),
    # 'gap' is a model variant (vit.VARIANTS) that the demo does not report.
    ('compare', 'compare.variants', "config.compare.variants: unknown demo variant 'vitt', 'gap'"),
    ('both', 'mode', "config.mode='both'; expected 'single' or 'compare'"),
], ids=['variant', 'compare_variants', 'mode'])
def test_bad_demo_setting_fails_before_the_dataset_is_built(tmp_path, mode, setting, message):
  config = demo_config.get_config('compare' if mode == 'compare' else None)
  config.data.data_dir = str(tmp_path / 'data')
  value = {'variant': 'vitt', 'compare.variants': ('vitt', 'vit', 'gap'), 'mode': 'both'}[setting]
  if setting == 'compare.variants':
    config.compare.variants = value
  else:
    config[setting] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    entry.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'data').exists()


@pytest.mark.parametrize('source', sorted(test_loading.UNLOADABLE))
def test_config_init_that_cannot_be_loaded_is_named(good_checkpoints, image_folder, tmp_path, source):
  init = test_loading.unloadable(source, good_checkpoints, tmp_path)
  config = tiny_classification_config(str(image_folder), init=str(init))
  with pytest.raises(ValueError, match=rf'^config\.init={re.escape(str(init))} cannot be loaded: '
                     rf'{re.escape(str(init))}{test_loading.UNLOADABLE[source]}'):
    entry.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_config_init_takes_prr_from_the_config_only_where_the_file_cannot_tell(tmp_path):
  bare = tmp_path / 'bare.safetensors'
  paths.write_bytes(bare, convert._timm_safetensors(test_loading.tiny_model()))
  with pytest.raises(ValueError, match=rf'^config\.init={re.escape(str(bare))} cannot be loaded: .*does not say '
                     'whether the model uses PRR'):
    common.load_model(bare)
  assert common.load_model(bare, prr_if_unstated=False).cfg.prr is False
  assert common.load_model(bare, prr_if_unstated=True).cfg.prr is True
  convert.write_hf(test_loading.tiny_model(prr=False), tmp_path / 'hf')  # its config.json says prr=False
  assert common.load_model(tmp_path / 'hf', prr_if_unstated=True).cfg.prr is False
