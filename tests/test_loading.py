"""`load()`: parity with the authors' model, architecture inference, and every way a load can fail."""

import argparse
import collections
import json
import pickle
import re
import shutil
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import locatvit_jax
from locatvit_jax import checkpoint, convert, loading
from locatvit_jax.layouts import vit as layouts_vit
from locatvit_jax.models import vit

FORWARD = nnx.jit(lambda model, images: (model(images), model.features(images)))


def relative_error(got, ref):
  return np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()


@pytest.fixture(scope='module')
def reference(parity_dir):
  return dict(np.load(parity_dir / 'reference.npz'))


@pytest.fixture(scope='module')
def parity_model(parity_dir):
  return locatvit_jax.load(parity_dir)


@pytest.fixture(scope='module')
def parity_state(parity_dir):
  return load_file(parity_dir / 'model.safetensors')


def write_timm(path, model):
  """`model` as the authors' timm-layout .safetensors."""
  save_file(convert.timm_state(model), path)
  return path


def tiny_model(**overrides):
  return locatvit_jax.create_model('locatvit_ti16', num_classes=5, width=64, depth=2, num_heads=2, mlp_dim=128,
                          drop_path=0.0, **overrides)


# -- the authors' checkpoint ----------------------------------------------------------------------
def test_parity_config_is_inferred_from_tensors_and_config_json(parity_model):
  assert parity_model.cfg == vit.ViTConfig(width=192, depth=12, num_heads=3, mlp_dim=768, patch_size=16,
                                           img_size=224, num_classes=10, gaug=True, prr=True)


@pytest.mark.parametrize('resolution', ['224', 'dyn'])
def test_parity_with_the_authors_model(parity_model, reference, resolution):
  logits, feats = FORWARD(parity_model, reference[f'images_{resolution}'])
  assert relative_error(logits, reference[f'logits_{resolution}']) <= 1e-4
  assert relative_error(feats, reference[f'features_{resolution}']) <= 1e-4


def test_safetensors_file_alone_gives_the_same_model(parity_dir, parity_model, reference):
  model = locatvit_jax.load(parity_dir / 'model.safetensors', prr=True)  # no config.json: the rest from the tensors
  assert model.cfg == parity_model.cfg
  jax.tree.map(np.testing.assert_array_equal, loading.get_params(model), loading.get_params(parity_model))
  logits, _ = FORWARD(model, reference['images_224'])
  assert relative_error(logits, reference['logits_224']) <= 1e-4


def test_overrides_win_over_inference(tmp_path):
  path = write_timm(tmp_path / 'tiny.safetensors', tiny_model())
  model = locatvit_jax.load(path, prr=False, dtype='bfloat16')
  assert (model.cfg.prr, model.cfg.dtype, model.cfg.gaug) == (False, 'bfloat16', True)


def test_mismatched_checkpoint_reports_every_tensor_at_once(parity_state, tmp_path):
  state = dict(parity_state)
  del state['blocks.3.attn.qkv.bias'], state['blocks.9.attn.gaug.log_alpha.weight']
  state['blocks.5.attn.extra.weight'] = np.zeros((4, 4), np.float32)
  state['blocks.7.mlp.fc2.weight'] = np.zeros((192, 100), np.float32)
  save_file(state, tmp_path / 'bad.safetensors')
  with pytest.raises(ValueError) as info:
    locatvit_jax.load(tmp_path / 'bad.safetensors', prr=True)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith('checkpoint does not fit width=192 depth=12 heads=3 patch=16 classes=10 gaug=True')
  for problem in ('missing blocks.3.attn.qkv.bias (576,)', 'missing blocks.9.attn.gaug.log_alpha.weight (1, 64)',
                  'unexpected blocks.5.attn.extra.weight (4, 4)',
                  'wrong shape blocks.7.mlp.fc2.weight: got (192, 100), expected (192, 768)'):
    assert problem in message
  assert message.count('; ') == 3


def test_build_model_reports_our_names(tmp_path):
  model = tiny_model()
  params = loading.flatten(loading.get_params(model))
  params['head/kernel'] = params.pop('head/kernel')[:, :3]
  del params['blocks/1/attn/gaug/var_proj/bias']
  params['blocks/1/attn/extra'] = np.zeros(3)
  with pytest.raises(ValueError, match=r'missing blocks/1/attn/gaug/var_proj/bias \(2,\); '
                     r'unexpected blocks/1/attn/extra \(3,\); '
                     r'wrong shape head/kernel: got \(64, 3\), expected \(64, 5\)$'):
    loading.build_model(model.cfg, params)


def test_build_model_takes_nested_or_flat_params():
  model = tiny_model()
  nested = loading.get_params(model)
  from_nested = loading.build_model(model.cfg, nested)
  from_flat = loading.build_model(model.cfg, loading.flatten(nested))
  jax.tree.map(np.testing.assert_array_equal, loading.get_params(from_flat), loading.get_params(from_nested))
  jax.tree.map(np.testing.assert_array_equal, loading.get_params(from_nested), nested)


def test_non_square_position_embedding_needs_the_image_size(tmp_path):
  model = tiny_model(img_size=(64, 96))
  path = write_timm(tmp_path / 'wide.safetensors', model)
  with pytest.raises(ValueError, match=r'pos_embed has 24 patch positions, not a square grid; .*img_size='):
    locatvit_jax.load(path, prr=True)
  assert locatvit_jax.load(path, prr=True, img_size=(64, 96)).cfg == model.cfg


@pytest.mark.parametrize('layout', ['file', 'folder', 'folder_with_config'])
def test_prr_is_never_guessed(tmp_path, layout):
  """PRR has no parameters: a GAug model's tensors are the same with it or without (the paper ablates
  both), so only config.json or `prr=` may say it."""
  model = tiny_model(prr=False)  # GAug only, which the tensors once passed for full LocAtViT
  if layout == 'file':
    path = source = write_timm(tmp_path / 'gaug_only.safetensors', model)
  else:
    path = source = tmp_path
    write_timm(tmp_path / 'model.safetensors', model)
    if layout == 'folder_with_config':
      source = tmp_path / 'config.json'
      source.write_text(json.dumps({'num_classes': 5}))  # no architecture, no model_args.prr
  with pytest.raises(ValueError) as info:
    locatvit_jax.load(path)
  message = str(info.value)
  assert message.startswith(f'{source}') and '\n' not in message
  for hint in ('uses PRR, which the tensors cannot tell', 'load(path, prr=True)', '--prr=true', 'config.json'):
    assert hint in message
  assert locatvit_jax.load(path, prr=False).cfg == model.cfg


# -- config.json -----------------------------------------------------------------------------------
@pytest.mark.parametrize('key, overrides', [
    ('prr', dict(gaug=False)), ('img_size', dict(pos_embed='none', img_size=32)),
], ids=['prr_from_the_name', 'img_size_from_input_size'])
def test_config_json_without_the_model_arg(key, overrides, tmp_path):
  """timm records only the kwargs that differ from the name's defaults. The authors' PRR-only ablation
  (`locatvit_tiny`, gaug=False) then has no prr: the name alone says PRR is on. Without a position
  embedding, only pretrained_cfg's input_size gives the grid GAug was built for."""
  model = tiny_model(**overrides)
  convert.write_hf(model, tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architecture'] == 'locatvit_tiny'
  del config['model_args'][key]
  (tmp_path / 'config.json').write_text(json.dumps(config))
  assert locatvit_jax.load(tmp_path).cfg == model.cfg


def test_config_json_naming_another_size_is_reported(tmp_path):
  convert.write_hf(tiny_model(), tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  del config['model_args']  # as in the authors' hub files: the name alone gives the sizes
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'architecture': 'locatvit_small'}))
  with pytest.raises(ValueError, match=r'checkpoint does not fit width=384 depth=12 heads=6 .*'
                     r'wrong shape patch_embed.proj.weight: got \(64, 3, 16, 16\), expected \(384, 3, 16, 16\)'):
    locatvit_jax.load(tmp_path)


def test_gap_model_keeps_its_class_token_through_the_hub_format(tmp_path):
  # timm's GAP ViTs may keep a class token that attends but is not pooled; config.json records it.
  model = locatvit_jax.create_model('locatvit_ti16', num_classes=3, img_size=32, width=32, depth=1,
                                    num_heads=2, mlp_dim=64, pool='gap', class_token=True, seed=0)
  convert.write_hf(model, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['model_args']['class_token'] is True
  again = locatvit_jax.load(tmp_path)
  assert (again.cfg.pool, again.cfg.class_token) == ('gap', True)
  x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(again(x)))


# -- paths that are not checkpoints -------------------------------------------------------------
@pytest.mark.parametrize('name', ['model.pth', 'model.pt', 'model.bin', 'model_best.pth.tar',
                                  'hf_dir/pytorch_model.bin'])
def test_torch_files_without_torch_say_how_to_proceed(tmp_path, monkeypatch, name):
  path = tmp_path / name
  path.parent.mkdir(exist_ok=True)
  path.write_bytes(b'not read: the import fails first')
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` fail even where it is installed
  target = path.parent if path.name == 'pytorch_model.bin' else path  # an HF-style directory
  with pytest.raises(ImportError, match=r'needs PyTorch, which is not installed: `pip install torch`, '
                     r'or convert it to \.safetensors'):
    locatvit_jax.load(target)


def test_unknown_file_suffix(tmp_path):
  path = tmp_path / 'model.ckpt'
  path.write_bytes(b'')
  with pytest.raises(ValueError, match=r'model\.ckpt: unknown checkpoint file type; expected \.safetensors, '
                     r'\.pth, \.pt, \.bin or \.pth\.tar'):
    locatvit_jax.load(path)


def test_directory_with_nothing_loadable(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match='found neither params/ \\+ model_config.json, training checkpoints, '
                     'nor config.json \\+ model.safetensors'):
    locatvit_jax.load(tmp_path)


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope: no such file or directory'):
    locatvit_jax.load(tmp_path / 'nope')


def test_state_dict_that_is_not_a_vit(tmp_path):
  save_file({'fc.weight': np.zeros((2, 2), np.float32)}, tmp_path / 'mlp.safetensors')
  with pytest.raises(ValueError, match=r"not a ViT state dict: no patch_embed.proj.weight among \['fc.weight'\]"):
    locatvit_jax.load(tmp_path / 'mlp.safetensors')


# -- damaged checkpoints: one ValueError that names the file -------------------------------------------
# Width 32, depth 1: the arrays of a real checkpoint, made without building (compiling) the model.
TINY_CFG = vit.ViTConfig(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, img_size=32, num_classes=3)


def random_params(cfg):
  """Params of `cfg` in the export layout, random so that every array has bytes on disk."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)


def write_training_checkpoint(workdir, params, record):
  """WORKDIR/checkpoints/1 as the trainers write it, with `record` as its model record."""
  import grain
  ckpt = checkpoint.TrainCheckpointer(workdir, save_every=1, use_async=False)
  ckpt.save(1, {'step': np.int32(1), 'params': params, 'opt_state': {}},
            iter(grain.MapDataset.range(1).to_iter_dataset()), record, {}, force=True)
  ckpt.close()
  return workdir


def write_segmentation_run(workdir, backbone='/runs/pretrain/export'):
  """A segmentation run's checkpoint and export, each with the record the segmentation trainer keeps
  (a head's params stand for the arrays: the record alone tells the run)."""
  from locatvit_jax.train import segmentation
  config = ml_collections.ConfigDict(dict(init=backbone, data=dict(num_classes=4), head_hidden=16))
  record = segmentation.head_config(config, TINY_CFG)
  head = {'proj': {'kernel': np.zeros((TINY_CFG.width, 4), np.float32)}}
  checkpoint.save_params(workdir / 'export', {'head': head}, ml_collections.ConfigDict(record))
  return write_training_checkpoint(workdir, head, record)


def cut_files(folder):
  for f in folder.iterdir():
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


# id: (what is damaged, how, the error). Orbax's array files are under ocdbt.process_0/d.
DAMAGES = {
    'export_arrays_cut': ('export', lambda d: cut_files(d / 'params/ocdbt.process_0/d'),
                          r'export/params: a damaged or incomplete Orbax checkpoint \(.*Error reading'),
    'export_metadata_garbled': ('export', lambda d: (d / 'params/_METADATA').write_text('{'),
                                r'export/params: a damaged or incomplete Orbax checkpoint '
                                r'\(no metadata that Orbax can read\)'),
    'export_config_missing': ('export', lambda d: (d / 'model_config.json').unlink(),
                              r'export: an incomplete params export, model_config.json is missing; '
                              r'expected params/ and model_config.json'),
    'export_params_missing': ('export', lambda d: shutil.rmtree(d / 'params'),
                              r'export: an incomplete params export, params is missing'),
    'export_config_garbled': ('export', lambda d: (d / 'model_config.json').write_text('{"width": 3'),
                              r'export/model_config.json: not valid JSON \(Expecting'),
    'export_config_not_an_object': ('export', lambda d: (d / 'model_config.json').write_text('[32]'),
                                    r'export/model_config.json: holds a JSON list; expected an object'),
    'export_config_unknown_field': ('export', lambda d: (d / 'model_config.json').write_text('{"widht": 32}'),
                                    r"export/model_config.json: unknown model config keys \['widht'\]"),
    'workdir_arrays_cut': ('workdir', lambda d: cut_files(d / 'checkpoints/1/state/ocdbt.process_0/d'),
                           r'workdir/checkpoints/1/state: a damaged or incomplete Orbax checkpoint \(.*Error reading'),
    'workdir_metadata_missing': ('workdir', lambda d: (d / 'checkpoints/1/state/_METADATA').unlink(),
                                 r'workdir/checkpoints/1/state: a damaged or incomplete Orbax checkpoint '
                                 r'\(no metadata that Orbax can read\)'),
    'workdir_record_missing': ('workdir', lambda d: shutil.rmtree(d / 'checkpoints/1/model_config'),
                               r'workdir/checkpoints/1/model_config/metadata: no such file; '
                               r'this training checkpoint is incomplete'),
}


def damaged_copy(good, name, dst):
  """A copy of the good export or workdir at `dst`, damaged as DAMAGES[name] says."""
  kind, damage, _ = DAMAGES[name]
  shutil.copytree(good / kind, dst / kind)
  damage(dst / kind)
  return dst / kind


# What load() says after the path of each unloadable() kind; the CLI (test_convert) and config.init
# (test_main) must say the same.
UNLOADABLE = {
    'garbage.safetensors': r': not a readable \.safetensors file \(Error while deserializing',
    'export_arrays_cut': r'/params: a damaged or incomplete Orbax checkpoint \(.*Error reading',
    'workdir_metadata_missing': r'/checkpoints/1/state: a damaged or incomplete Orbax checkpoint \(no metadata',
    'segment': r' is a segmentation run \(a head on a frozen backbone\), not a classification model; '
               r'its backbone is config\.init=/runs/pretrain/export, and .*load_export',
}


def unloadable(kind, good, dst):
  """A path at `dst` that load() must refuse: 'garbage.safetensors', 'segment' (a segmentation run)
  or a damaged copy of `good` (a DAMAGES name)."""
  if kind == 'garbage.safetensors':
    (dst / kind).write_bytes(b'not a safetensors file')
    return dst / kind
  if kind == 'segment':
    return write_segmentation_run(dst / kind)
  return damaged_copy(good, kind, dst)


def write_good_checkpoints(root):
  """ROOT/export (a params export) and ROOT/workdir (training checkpoints) of TINY_CFG, to damage copies of."""
  params = random_params(TINY_CFG)
  checkpoint.save_params(root / 'export', params, TINY_CFG)
  write_training_checkpoint(root / 'workdir', params, json.loads(TINY_CFG.to_json()))
  return root


@pytest.mark.parametrize('name', sorted(DAMAGES))
def test_damaged_checkpoint_is_one_error_naming_the_file(good_checkpoints, tmp_path, name):
  path = damaged_copy(good_checkpoints, name, tmp_path)
  with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + '/' + DAMAGES[name][2]) as info:
    locatvit_jax.load(path)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('cut', [0, 7, -100], ids=['empty', 'header_cut', 'data_cut'])
def test_damaged_safetensors_file_is_named(tmp_path, cut):
  save_file({'patch_embed.proj.weight': np.ones((32, 3, 8, 8), np.float32)}, tmp_path / 'model.safetensors')
  path = tmp_path / 'model.safetensors'
  path.write_bytes(path.read_bytes()[:cut])
  with pytest.raises(ValueError, match=rf'^{re.escape(str(path))}: not a readable \.safetensors file '
                     r'\(Error while deserializing'):
    locatvit_jax.load(path)


def test_hf_config_json_that_is_not_json_is_named(tmp_path):
  (tmp_path / 'config.json').write_text('{"architecture": ')
  save_file({'patch_embed.proj.weight': np.ones((32, 3, 8, 8), np.float32)}, tmp_path / 'model.safetensors')
  with pytest.raises(ValueError, match=rf'^{re.escape(str(tmp_path))}/config.json: not valid JSON \(Expecting'):
    locatvit_jax.load(tmp_path)


# -- PyTorch files, through a stand-in for torch (not installed here) -----------------------------------
class FakeTensor:
  """What loading uses of torch.Tensor, over a numpy array."""

  def __init__(self, array):
    self.array = np.asarray(array)

  def __reduce__(self):  # through one allowlisted function, as torch pickles its tensors
    # Values, not bytes: protocol 2 pickles bytes through a global of its own (_codecs.encode).
    return rebuild_tensor, (self.array.tolist(), self.array.dtype.str)

  def is_floating_point(self):
    return self.array.dtype.kind == 'f'

  def float(self):
    return FakeTensor(self.array.astype(np.float32))

  def numpy(self):
    return self.array


def rebuild_tensor(values, dtype):
  return FakeTensor(np.asarray(values, dtype))


class WeightsOnlyUnpickler(pickle.Unpickler):
  """torch.load(weights_only=True)'s rule: globals beyond its allowlist (tensors, OrderedDict) are refused,
  in torch 2.6's words (shortened)."""

  def find_class(self, module, name):
    if (module, name) in {(__name__, 'rebuild_tensor'), ('collections', 'OrderedDict')}:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        'Weights only load failed. This file can still be loaded, to do so you have two options, do those steps '
        'only if you trust the source of the checkpoint.\n\t(1) ...\n\tWeightsUnpickler error: Unsupported global: '
        f'GLOBAL {module}.{name} was not an allowed global by default. Please use '
        f'`torch.serialization.add_safe_globals([{name}])` ... if you trust this class/function.')


def fake_torch(loads=None):
  """A stand-in for torch whose load() returns or raises `loads`; without, it unpickles the file as torch
  does, refusing with weights_only=True what WeightsOnlyUnpickler refuses. (torch.save writes a zip around
  the pickle; write_torch writes the pickle alone, which this load reads.)"""
  def load(f, map_location=None, weights_only=True):
    del map_location
    if loads is None:
      return (WeightsOnlyUnpickler if weights_only else pickle.Unpickler)(f).load()
    if isinstance(loads, Exception):
      raise loads
    return loads
  return types.SimpleNamespace(load=load, Tensor=FakeTensor)


def write_torch(path, obj):
  path.write_bytes(pickle.dumps(obj, protocol=2))  # torch.save's protocol
  return path


def torch_state(model, offset=0.0, prefix=''):
  """`model` as a timm state dict of tensors, as torch keeps it: each weight plus `offset`, each key after `prefix`."""
  state = convert.timm_state(model)
  return collections.OrderedDict((prefix + k, FakeTensor(v + offset)) for k, v in state.items())


def training_checkpoint(model, args=None, ema=True):
  """What timm's CheckpointSaver writes: with `args` (train.py's argparse.Namespace) and EMA weights (the
  weights plus 1), keys prefixed as DistributedDataParallel and torch.compile leave them."""
  ckpt = {'epoch': 9, 'arch': args.model if args else 'locatvit', 'state_dict': torch_state(model, prefix='module.'),
          'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3, 'params': [0, 1]}]}, 'version': 2,
          'metric': 61.5}
  if ema:
    ckpt['state_dict_ema'] = torch_state(model, offset=1.0, prefix='_orig_mod.')
  if args:
    ckpt['args'] = args
  return ckpt


def train_args(cfg):
  """timm train.py's arguments for `cfg`: --model NAME --model-kwargs with every setting, as --to-hf's model_args."""
  return argparse.Namespace(model=layouts_vit.architecture(cfg), gp=None, num_classes=cfg.num_classes, img_size=None,
                            model_ema=True, model_kwargs=layouts_vit.hf_config(cfg)['model_args'])


def assert_params(model, want, offset=0.0):
  jax.tree.map(lambda got, w: np.testing.assert_array_equal(got, np.asarray(w) + offset),
               loading.get_params(model), loading.get_params(want))


def test_training_checkpoint_loads_only_when_trusted_and_its_args_tell_the_model(tmp_path, monkeypatch):
  """timm's train.py checkpoints pickle its argparse.Namespace, which torch.load(weights_only=True) refuses.
  Trusted, the arguments give the model's name (so PRR is on) and kwargs (the heads, which tensors without
  GAug cannot tell)."""
  monkeypatch.setitem(sys.modules, 'torch', fake_torch())
  model = tiny_model(gaug=False)  # the PRR-only ablation: the tensors tell neither PRR nor the heads
  args = argparse.Namespace(model='locatvit_tiny', gp=None, num_classes=5, img_size=None, model_ema=True,
                            model_kwargs=dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, gaug=False))
  path = write_torch(tmp_path / 'model_best.pth.tar', training_checkpoint(model, args))
  with pytest.raises(ValueError) as info:
    locatvit_jax.load(path)
  message = str(info.value)
  assert message.startswith(f'{path}: pickles argparse.Namespace besides tensors') and '\n' not in message
  for hint in ('can run code', 'load(path, trust_pickle=True)', '--trust-pickle'):
    assert hint in message
  trusted = locatvit_jax.load(path, trust_pickle=True)
  assert trusted.cfg == model.cfg
  assert_params(trusted, model)
  assert_params(locatvit_jax.load(path, trust_pickle=True, ema=True), model, offset=1.0)


def test_ema_is_read_only_where_there_is_one(tmp_path, monkeypatch, good_checkpoints):
  monkeypatch.setitem(sys.modules, 'torch', fake_torch())
  model = tiny_model()
  last = write_torch(tmp_path / 'last.pth.tar', training_checkpoint(model, ema=False))
  assert_params(locatvit_jax.load(last, prr=True), model)  # no args, no other objects: read untrusted
  for path in (last, write_timm(tmp_path / 'model.safetensors', model), good_checkpoints / 'export'):
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: holds no EMA weights; ema=True reads"):
      locatvit_jax.load(path, prr=True, ema=True)


@pytest.mark.parametrize('loads, message', [
    (pickle.UnpicklingError("Weights only load failed.\nPlease file an issue."),
     r": not a PyTorch checkpoint that torch.load reads \(Weights only load failed.\)$"),
    (RuntimeError('PytorchStreamReader failed reading zip archive: failed finding central directory'),
     r': not a PyTorch checkpoint that torch.load reads \(PytorchStreamReader failed'),
    ([np.zeros(3)], r": holds a list that is not a state dict; expected tensors by name"),
    ({'epoch': 3}, r": holds a dict that is not a state dict"),
], ids=['unpickling', 'not_a_zip', 'a_list', 'no_tensors'])
def test_torch_file_that_torch_cannot_read_is_named(tmp_path, monkeypatch, loads, message):
  path = tmp_path / 'model.pth'
  path.write_bytes(b'not a pickle')
  monkeypatch.setitem(sys.modules, 'torch', fake_torch(loads))
  with pytest.raises(ValueError, match=re.escape(str(path)) + message):
    locatvit_jax.load(path)


@pytest.fixture(scope='module')
def segmentation_run(tmp_path_factory):
  return write_segmentation_run(tmp_path_factory.mktemp('segment'))


@pytest.mark.parametrize('sub', ['', 'checkpoints', 'checkpoints/1', 'export'],
                         ids=['workdir', 'checkpoints', 'step', 'export'])
def test_segmentation_run_is_named_with_its_backbone(segmentation_run, sub):
  path = segmentation_run / sub
  with pytest.raises(ValueError, match=rf'^{re.escape(str(path))} is a segmentation run \(a head on a frozen '
                     r'backbone\), not a classification model; its backbone is config.init=/runs/pretrain/export, and '
                     r'locatvit_jax.train.segmentation.load_export\(WORKDIR/export\) loads backbone and head$'):
    locatvit_jax.load(path)
