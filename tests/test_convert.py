"""The convert CLI and the key rules: official -> ours -> official bit for bit, the params export that
any JAX program reads with Orbax alone, and the Hugging Face folder (--to-hf) that load() rebuilds from."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import locatvit_jax
from locatvit_jax import checkpoint, convert, loading, predict
from locatvit_jax.layouts import vit as layouts_vit
from locatvit_jax.models import vit
from tests import test_loading
from tests.conftest import REPO

# The documented export layout (README, "Params on disk"), written out independently of
# layouts/vit.py's rules: our path -> (timm key, axis permutation taking the timm tensor to ours).
LINEAR, CONV = (1, 0), (2, 3, 1, 0)  # (out, in) -> (in, out); OIHW -> HWIO
TOP_LEVEL = {
    'patch_embed/kernel': ('patch_embed.proj.weight', CONV),
    'patch_embed/bias': ('patch_embed.proj.bias', None),
    'cls_token': ('cls_token', None),
    'pos_embed': ('pos_embed', None),
    'norm/scale': ('norm.weight', None),
    'norm/bias': ('norm.bias', None),
    'head/kernel': ('head.weight', LINEAR),
    'head/bias': ('head.bias', None),
}
PER_BLOCK = {
    'norm1/scale': ('norm1.weight', None),
    'norm1/bias': ('norm1.bias', None),
    'attn/qkv/kernel': ('attn.qkv.weight', LINEAR),
    'attn/qkv/bias': ('attn.qkv.bias', None),
    'attn/proj/kernel': ('attn.proj.weight', LINEAR),
    'attn/proj/bias': ('attn.proj.bias', None),
    'attn/gaug/var_proj/kernel': ('attn.gaug.log_var.weight', LINEAR),
    'attn/gaug/var_proj/bias': ('attn.gaug.log_var.bias', None),
    'attn/gaug/alpha_proj/kernel': ('attn.gaug.log_alpha.weight', LINEAR),
    'attn/gaug/alpha_proj/bias': ('attn.gaug.log_alpha.bias', None),
    'norm2/scale': ('norm2.weight', None),
    'norm2/bias': ('norm2.bias', None),
    'mlp/fc1/kernel': ('mlp.fc1.weight', LINEAR),
    'mlp/fc1/bias': ('mlp.fc1.bias', None),
    'mlp/fc2/kernel': ('mlp.fc2.weight', LINEAR),
    'mlp/fc2/bias': ('mlp.fc2.bias', None),
}
DOCUMENTED_LAYOUT = {**TOP_LEVEL, **{f'blocks/{i}/{ours}': (f'blocks.{i}.{timm}', perm)
                                     for i in range(12) for ours, (timm, perm) in PER_BLOCK.items()}}

# Runs in a fresh interpreter: restores DIR/params as the checkpoint docstring says any JAX
# program can, and writes what it found as '/'-joined keys.
ORBAX_ONLY = '''
import os, sys
import jax, numpy as np, orbax.checkpoint as ocp
from safetensors.numpy import save_file

params = ocp.StandardCheckpointer().restore(os.path.abspath(sys.argv[1]))
flat, odd = {}, []
def walk(node, prefix):
  for key, value in node.items():
    path = prefix + str(key)
    if not isinstance(key, str):
      odd.append(f'non-string key {path}')
    if isinstance(value, dict):
      walk(value, path + '/')
    elif isinstance(value, (np.ndarray, jax.Array)):
      flat[path] = np.asarray(value)
    else:
      odd.append(f'{path} is a {type(value).__name__}')
walk(params, '')
save_file(flat, sys.argv[2])
print('; '.join(odd) or 'plain')
assert 'locatvit_jax' not in sys.modules, 'the reader imported locatvit_jax'
'''


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'locatvit_jax.convert', *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def official(parity_dir):
  return load_file(parity_dir / 'model.safetensors')


@pytest.fixture(scope='module')
def cli_round_trip(parity_dir, tmp_path_factory):
  """official -> our params export -> timm .safetensors, through the CLI as users run it."""
  tmp = tmp_path_factory.mktemp('cli')
  export, back = tmp / 'export', tmp / 'back.safetensors'
  for args in ((parity_dir / 'model.safetensors', export, '--prr=true'), (export, back, '--to-timm')):
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f'wrote {args[1]}\n'
    assert 'Warning' not in done.stderr, done.stderr  # e.g. runpy's "found in sys.modules"
  return export, back


def test_cli_round_trip_is_bit_identical(cli_round_trip, official):
  back = load_file(cli_round_trip[1])
  assert sorted(back) == sorted(official)
  for key, tensor in official.items():
    assert (back[key].dtype, back[key].shape) == (tensor.dtype, tensor.shape), key
    assert back[key].tobytes() == tensor.tobytes(), key


def test_export_reproduces_the_reference_logits(cli_round_trip, parity_dir):
  reference = np.load(parity_dir / 'reference.npz')
  model = locatvit_jax.load(cli_round_trip[0])
  logits = nnx.jit(lambda m, x: m(x))(model, reference['images_224'])
  assert np.abs(logits - reference['logits_224']).max() / np.abs(reference['logits_224']).max() <= 1e-4


def test_export_restores_with_orbax_alone(cli_round_trip, official, tmp_path):
  found = tmp_path / 'found.safetensors'
  done = subprocess.run([sys.executable, '-c', ORBAX_ONLY, cli_round_trip[0] / 'params', found],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == 'plain'
  restored = load_file(found)
  assert sorted(restored) == sorted(DOCUMENTED_LAYOUT)
  for ours, (timm, perm) in DOCUMENTED_LAYOUT.items():
    want = official[timm] if perm is None else official[timm].transpose(perm)
    assert restored[ours].dtype == want.dtype, ours
    np.testing.assert_array_equal(restored[ours], want, err_msg=ours)


@pytest.mark.parametrize('overrides', [dict(pool='gap'), dict(reg_tokens=4)], ids=['gap', 'registers'])
def test_variants_round_trip_through_the_timm_layout(overrides, tmp_path):
  model = locatvit_jax.create_model('locatvit_ti16', num_classes=5, img_size=64, width=64, depth=2, num_heads=2,
                           mlp_dim=128, drop_path=0.0, seed=3, **overrides)
  ours = loading.flatten(jax.tree.map(np.asarray, loading.get_params(model)))
  gap = model.cfg.pool == 'gap'
  timm = layouts_vit.to_timm(ours, model.cfg)
  if gap:  # timm's GAP model: no class token, the final norm after pooling is `fc_norm`
    assert 'cls_token' not in timm and 'norm.weight' not in timm and timm['fc_norm.weight'].shape == (64,)
    assert timm['pos_embed'].shape == (1, 16, 64)
  else:
    assert timm['reg_token'].shape == (1, 4, 64) and timm['pos_embed'].shape == (1, 1 + 4 + 16, 64)
  back = layouts_vit.to_ours(timm, model.cfg)
  assert sorted(back) == sorted(ours)
  for path, value in ours.items():
    assert back[path].tobytes() == value.tobytes() and back[path].shape == value.shape, path
  save_file({k: np.ascontiguousarray(v) for k, v in timm.items()}, tmp_path / 'model.safetensors')
  loaded = locatvit_jax.load(tmp_path / 'model.safetensors', prr=True)
  assert loaded.cfg == model.cfg
  jax.tree.map(np.testing.assert_array_equal, loading.get_params(loaded), loading.get_params(model))


# -- the Hugging Face folder (--to-hf) ------------------------------------------------------------------
# Width 32, depth 2, 32 px in a 4x4 grid of 8 px patches: seconds on a CPU.
TINY_HF = dict(num_classes=5, img_size=32, width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, drop_path=0.0)
# timm's VisionTransformer kwargs for TINY_HF, as config.json's model_args records them.
TINY_ARGS = dict(img_size=[32, 32], patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, class_token=True,
                 global_pool='token', reg_tokens=0)


def test_hf_config_is_timm_hub_format():
  """timm's save_config_for_hf layout. model_args are the constructor's kwargs: the authors' LocAtViT takes
  gaug, prr and no_pos_emb, timm's VisionTransformer (plain ViT) pos_embed and would reject the others."""
  locat = layouts_vit.hf_config(vit.model_config('locatvit_ti16', **TINY_HF, pool='gap', reg_tokens=2))
  assert locat == {
      'architecture': 'locatvit_tiny', 'num_classes': 5, 'num_features': 32, 'global_pool': 'avg',
      'model_args': {**TINY_ARGS, 'class_token': False, 'global_pool': 'avg', 'reg_tokens': 2,
                     'gaug': True, 'prr': True, 'no_pos_emb': False},
      'pretrained_cfg': {'input_size': [3, 32, 32], 'interpolation': 'bicubic', 'crop_mode': 'center',
                         'crop_pct': 224 / 248, 'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5], 'num_classes': 5,
                         'first_conv': 'patch_embed.proj', 'classifier': 'head'}}
  plain = layouts_vit.hf_config(vit.model_config('vit_ti16', **TINY_HF))
  assert plain['architecture'] == 'vit_tiny_patch16_224' and plain['global_pool'] == 'token'
  assert plain['model_args'] == {**TINY_ARGS, 'pos_embed': 'learn'}
  # Without position embedding: the authors' NoPosVisionTransformer, which sets pos_embed itself.
  nopos = layouts_vit.hf_config(vit.model_config('vit_ti16', **TINY_HF, pos_embed='none'))
  assert nopos['architecture'] == 'nopos_vit_tiny_patch16_224' and nopos['model_args'] == TINY_ARGS


def test_timms_own_no_position_embedding_vit_is_refused():
  # timm 1.0.19's VisionTransformer(pos_embed='none') never prepends its class token: not what we compute.
  hf = {'architecture': 'vit_tiny_patch16_224', 'model_args': {**TINY_ARGS, 'pos_embed': 'none'}}
  with pytest.raises(ValueError, match=r"^config.json builds timm's VisionTransformer with pos_embed='none', which "
                     'never prepends its class and register tokens'):
    layouts_vit.config_json_fields({}, hf)
  # Without prefix tokens there is nothing to drop: the same model.
  no_prefix = {'model_args': {**TINY_ARGS, 'class_token': False, 'global_pool': 'avg', 'pos_embed': 'none'}}
  assert layouts_vit.config_json_fields({}, no_prefix)['pos_embed'] == 'none'


@pytest.mark.parametrize('name', sorted(vit.MODEL_ALIASES))
def test_hf_architecture_is_the_authors_name_at_the_sizes_they_register(name):
  cfg = vit.model_config(name, img_size=384, num_classes=10, pool='gap')  # none of these is in a name
  assert layouts_vit.architecture(cfg) == name
  # Other sizes and patches: the family's tiny constructor; model_args carry the real ones.
  tiny = ('locatvit_tiny' if name.startswith('locatvit') else
          'nopos_vit_tiny_patch16_224' if name.startswith('nopos') else 'vit_tiny_patch16_224')
  assert layouts_vit.architecture(dataclasses.replace(cfg, patch_size=8)) == tiny


@pytest.mark.parametrize('name, overrides, architecture', [
    ('locatvit_ti16', {}, 'locatvit_tiny'),
    ('locatvit_ti16', dict(prr=False), 'locatvit_tiny'),  # GAug only
    ('locatvit_ti16', dict(gaug=False), 'locatvit_tiny'),  # PRR only: the tensors cannot tell PRR
    ('vit_ti16', {}, 'vit_tiny_patch16_224'),  # no GAug: the tensors cannot tell the heads
    ('locatvit_ti16', dict(pool='gap'), 'locatvit_tiny'),
    ('locatvit_ti16', dict(reg_tokens=4), 'locatvit_tiny'),
    ('locatvit_ti16', dict(pos_embed='none'), 'locatvit_tiny'),  # no pos_embed: the tensors cannot tell the grid
    ('vit_ti16', dict(pos_embed='none'), 'nopos_vit_tiny_patch16_224'),  # the authors' class, not timm's
], ids=['locat', 'gaug_only', 'prr_only', 'plain', 'gap', 'registers', 'no_pos_embed', 'plain_no_pos_embed'])
def test_variants_round_trip_through_the_hf_folder(name, overrides, architecture, tmp_path):
  model = locatvit_jax.create_model(name, seed=3, **{**TINY_HF, **overrides})
  convert.write_hf(model, tmp_path / 'hf')
  assert sorted(p.name for p in (tmp_path / 'hf').iterdir()) == ['config.json', 'model.safetensors']
  assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['architecture'] == architecture
  loaded = locatvit_jax.load(tmp_path / 'hf')
  assert loaded.cfg == model.cfg
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(loaded(images), model(images))


def test_cli_writes_the_hf_folder(tmp_path):
  model = locatvit_jax.create_model('locatvit_ti16', seed=4, **{**TINY_HF, 'pool': 'gap'})
  checkpoint.save_params(tmp_path / 'export', loading.get_params(model), model.cfg)
  done = run_cli(tmp_path / 'export', tmp_path / 'hf', '--to-hf')
  assert done.returncode == 0, done.stderr
  assert done.stdout == f'wrote {tmp_path / "hf"}\n'
  assert 'Warning' not in done.stderr, done.stderr
  # The tensors are --to-timm's file, byte for byte.
  convert.to_timm(tmp_path / 'export', tmp_path / 'timm.safetensors')
  assert (tmp_path / 'hf' / 'model.safetensors').read_bytes() == (tmp_path / 'timm.safetensors').read_bytes()
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(locatvit_jax.load(tmp_path / 'hf')(images), model(images))


def test_key_rules_reject_what_they_do_not_know():
  token, gap = vit.ViTConfig(), vit.ViTConfig(pool='gap')
  with pytest.raises(ValueError, match=r"no rule for timm key 'blocks.0.attn.q_norm.weight' with class-token"):
    layouts_vit.to_ours({'blocks.0.attn.q_norm.weight': np.zeros(4)}, token)
  with pytest.raises(ValueError, match=r"no rule for timm key 'norm.weight' with GAP pooling"):
    layouts_vit.to_ours({'norm.weight': np.zeros(4)}, gap)
  with pytest.raises(ValueError, match=r"no timm name for our parameter 'blocks/0/attn/extra/kernel'"):
    layouts_vit.to_timm({'blocks/0/attn/extra/kernel': np.zeros(4)}, token)


@pytest.mark.parametrize('args, message', [
    (('{tmp}/missing.safetensors', '{tmp}/out'), 'missing.safetensors: no such file or directory'),
    (('{tmp}/notes.txt', '{tmp}/out'), 'notes.txt: unknown checkpoint file type'),
    (('{tmp}', '{tmp}/out'), 'found neither params/'),
    (('{tmp}/notes.txt', '{tmp}/out.safetensors'), 'out.safetensors: writing .safetensors needs --to-timm'),
    (('{tmp}/notes.txt', '{tmp}/out', '--to-timm'), 'out: --to-timm writes a .safetensors file'),
    (('{tmp}/notes.txt', '{tmp}/out.safetensors', '--to-hf'), 'out.safetensors: --to-hf writes a folder'),
    (('{tmp}/notes.txt', '{tmp}/notes.txt', '--to-hf'), 'notes.txt: is a file, and --to-hf writes a directory'),
])
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
  (tmp_path / 'notes.txt').write_text('not a checkpoint')
  assert convert.main([a.format(tmp=tmp_path) for a in args]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'out.safetensors').exists()


def test_cli_flags_state_what_the_source_cannot_tell(tmp_path, capsys, monkeypatch):
  """--prr for a state dict without config.json; --trust-pickle and --ema for the authors' training checkpoints."""
  model = locatvit_jax.create_model('locatvit_ti16', seed=5, **{**TINY_HF, 'prr': False})
  bare = test_loading.write_timm(tmp_path / 'gaug_only.safetensors', model)
  assert convert.main([str(bare), str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {bare} (no config.json) does not say whether the model uses PRR'), err
  assert '--prr=true' in err
  assert not (tmp_path / 'out').exists()
  assert convert.main([str(bare), str(tmp_path / 'out'), '--prr=false']) == 0
  assert locatvit_jax.load(tmp_path / 'out').cfg == model.cfg

  monkeypatch.setitem(sys.modules, 'torch', test_loading.fake_torch())
  ckpt = test_loading.write_torch(tmp_path / 'model_best.pth.tar',
                                  test_loading.training_checkpoint(model, test_loading.train_args(model.cfg)))
  assert convert.main([str(ckpt), str(tmp_path / 'hf'), '--to-hf']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {ckpt}: pickles argparse.Namespace') and '--trust-pickle' in err
  assert not (tmp_path / 'hf').exists()
  assert convert.main([str(ckpt), str(tmp_path / 'hf'), '--to-hf', '--trust-pickle', '--ema']) == 0
  loaded = locatvit_jax.load(tmp_path / 'hf')
  assert loaded.cfg == model.cfg
  test_loading.assert_params(loaded, model, offset=1.0)


@pytest.mark.parametrize('cli', [convert, predict], ids=['convert', 'predict'])
def test_cli_help_documents_the_load_flags(cli, capsys):
  with pytest.raises(SystemExit):
    cli.main(['--help'])
  out = ' '.join(capsys.readouterr().out.split())  # argparse wraps the help text
  for text in ('--prr {true,false} whether the model uses PRR, for a state dict without config.json', '--ema',
               '--trust-pickle', 'unpickling can run code'):
    assert text in out


@pytest.mark.parametrize('source', sorted(test_loading.UNLOADABLE))
@pytest.mark.parametrize('to', [[], ['--to-hf']], ids=['orbax', 'hf'])
def test_cli_on_a_damaged_source_is_one_error_line_and_writes_nothing(good_checkpoints, tmp_path, capsys, source, to):
  src = test_loading.unloadable(source, good_checkpoints, tmp_path)
  (tmp_path / 'out').mkdir()  # an existing DST folder: what was in it stays as it was
  (tmp_path / 'out' / 'notes.txt').write_text('kept')
  assert convert.main([str(src), str(tmp_path / 'out'), *to]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and re.match(f'error: {re.escape(str(src))}{test_loading.UNLOADABLE[source]}', err), err
  assert [p.name for p in (tmp_path / 'out').iterdir()] == ['notes.txt']


def test_export_from_eight_devices_restores_with_orbax_alone_on_one(parity_dir, official, tmp_path):
  """An export written from a (data 2, fsdp 2, tensor 2) mesh reads with the README's line on 1 device."""
  import ml_collections
  from locatvit_jax import checkpoint, sharding

  model = locatvit_jax.load(parity_dir)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  params = locatvit_jax.get_params(model)
  sharded = jax.device_put(params, sharding.tree_shardings(params, mesh))
  qkv = sharded['blocks']['0']['attn']['qkv']['kernel']
  assert len(qkv.sharding.device_set) == 8 and not qkv.sharding.is_fully_replicated
  checkpoint.save_params(tmp_path / 'export', sharded, model.cfg)

  found = tmp_path / 'found.safetensors'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  done = subprocess.run([sys.executable, '-c', ORBAX_ONLY, tmp_path / 'export' / 'params', found],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == 'plain'
  restored = load_file(found)
  for ours, (timm, perm) in DOCUMENTED_LAYOUT.items():
    want = official[timm] if perm is None else official[timm].transpose(perm)
    np.testing.assert_array_equal(restored[ours], want, err_msg=ours)
