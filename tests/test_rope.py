"""RoPE-Mixed ViT family: parity with the authors' LocAtRoPEViT, their layout both ways, the rotary maths
against an independent NumPy transcription of timm's, init, sharding rules."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import locatvit_jax
from conftest import shared_fixture, tiny_classification_config
from locatvit_jax import convert, loading, metrics, sharding
from locatvit_jax.configs import common
from locatvit_jax.layouts import rope as layout
from locatvit_jax.models import registry, rope
from locatvit_jax.train import classification, optim

FORWARD = nnx.jit(lambda model, images: (model(images), model.features(images)))


def relative_error(got, ref):
  return np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()


def tiny(name='locatvit_tiny_rope_mixed', **overrides):
  sizes = dict(width=32, depth=2, num_heads=2, mlp_dim=64, img_size=32, drop_path=0.0)
  return registry.build(rope.model_config(name, num_classes=5, **{**sizes, **overrides}), rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def folder():
  return shared_fixture('parity', 'locatvit_rope_random')


@pytest.fixture(scope='module')
def state(folder):
  return load_file(folder / 'model.safetensors')


@pytest.fixture(scope='module')
def hf(folder):
  return json.loads((folder / 'config.json').read_text())


@pytest.fixture(scope='module')
def reference(folder):
  return dict(np.load(folder / 'reference.npz'))


@pytest.fixture(scope='module')
def parity_model(folder):
  return locatvit_jax.load(folder)


# -- the authors' checkpoint ----------------------------------------------------------------------------
def test_parity_config_from_tensors_and_config_json(parity_model, state, hf):
  assert parity_model.cfg == rope.RoPEConfig(width=192, depth=4, num_heads=3, mlp_dim=768, patch_size=16,
                                             img_size=224, num_classes=10, gaug=True, prr=True)
  # load() dispatches to this family's layout: the same as using it directly.
  cfg = layout.config(layout.fields(state, hf), state)
  assert cfg == parity_model.cfg
  direct = layout.to_ours(state, cfg)
  ours = loading.flatten(loading.get_params(parity_model))
  assert sorted(direct) == sorted(ours)
  for path, value in direct.items():
    np.testing.assert_array_equal(ours[path], value, err_msg=path)


@pytest.mark.parametrize('resolution', ['224', 'dyn'])
def test_parity_with_the_authors_model(parity_model, reference, resolution):
  """At 224 and at 288x352 (rotary grid of the input, GAug variances rescaled)."""
  logits, feats = FORWARD(parity_model, reference[f'images_{resolution}'])
  assert relative_error(logits, reference[f'logits_{resolution}']) <= 1e-4
  assert relative_error(feats, reference[f'features_{resolution}']) <= 1e-4


def test_timm_to_ours_to_timm_is_bit_exact(state, parity_model):
  back = layout.to_timm(layout.to_ours(state, parity_model.cfg), parity_model.cfg)
  assert sorted(back) == sorted(state)
  for key, tensor in state.items():
    assert back[key].dtype == tensor.dtype and back[key].flags.c_contiguous, key
    np.testing.assert_array_equal(back[key], tensor, err_msg=key)


def test_state_dict_alone_needs_prr_stated(folder, parity_model):
  with pytest.raises(ValueError, match='does not say whether the model uses PRR'):
    locatvit_jax.load(folder / 'model.safetensors')
  assert locatvit_jax.load(folder / 'model.safetensors', prr=True).cfg == parity_model.cfg


def test_convert_both_ways_is_bit_exact(folder, state, parity_model, tmp_path):
  """The authors' folder -> our Orbax export -> timm .safetensors and a Hugging Face folder."""
  assert convert.main([str(folder), str(tmp_path / 'ours')]) == 0
  assert convert.main([str(tmp_path / 'ours'), str(tmp_path / 'back.safetensors'), '--to-timm']) == 0
  back = load_file(tmp_path / 'back.safetensors')
  assert sorted(back) == sorted(state)
  for key, tensor in state.items():
    np.testing.assert_array_equal(back[key], tensor, err_msg=key)
  assert convert.main([str(tmp_path / 'ours'), str(tmp_path / 'hf'), '--to-hf']) == 0
  hf = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf['architecture'] == 'locatvit_tiny_rope_mixed'
  assert locatvit_jax.load(tmp_path / 'hf').cfg == parity_model.cfg


def test_layout_claims_rope_checkpoints_only(state, hf):
  assert layout.claims(state, hf)
  assert layout.claims({}, {'architecture': 'vit_tiny_patch16_rope_mixed_224'})
  vit_state = {k: v for k, v in state.items() if k != 'rope.freqs'}
  assert not layout.claims(vit_state, {'architecture': 'locatvit_tiny'})


# -- our models in the authors' layout ----------------------------------------------------------------
@pytest.mark.parametrize('name, overrides, architecture', [
    ('locatvit_tiny_rope_mixed', {}, 'locatvit_tiny_rope_mixed'),
    ('vit_tiny_rope_mixed', {}, 'vit_tiny_patch16_rope_mixed_224'),
    ('locatvit_tiny_rope_mixed', dict(prr=False), 'locatvit_tiny_rope_mixed'),  # GAug-only ablation
    ('vit_base_rope_mixed', dict(img_size=(64, 96)), 'vit_base_patch16_rope_mixed_224'),
    # A size nobody registers: the family's tiny constructor, with the sizes in model_args.
    ('locatvit_base_rope_mixed', dict(width=64, depth=2, num_heads=2, mlp_dim=128), 'locatvit_tiny_rope_mixed'),
])
def test_hf_config_and_tensors_give_back_the_config(name, overrides, architecture):
  cfg = rope.model_config(name, num_classes=7, **overrides)
  # Shapes only: the layout needs no values to name and place the tensors.
  abstract = nnx.eval_shape(lambda: registry.build(cfg, rngs=nnx.Rngs(0)))
  flat = loading.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  timm = {k: np.zeros(v.shape, np.float32) for k, v in layout.to_timm(
      {k: np.zeros(v.shape, np.float32) for k, v in flat.items()}, cfg).items()}
  hf = layout.hf_config(cfg)
  assert hf['architecture'] == architecture
  assert hf['pretrained_cfg']['mean'] == [0.485, 0.456, 0.406]  # ImageNet's, as the authors' RoPE models
  got = layout.config(layout.fields(timm, json.loads(json.dumps(hf))), timm)
  assert got == dataclasses.replace(cfg, drop_path=0.0)


def test_fresh_model_round_trips_through_the_timm_layout():
  model = tiny()
  flat = loading.flatten(loading.get_params(model))
  timm = layout.to_timm(flat, model.cfg)
  assert {'rope.freqs', 'blocks.1.gamma_2', 'blocks.0.attn.gaug.log_var.weight'} <= set(timm)
  assert timm['rope.freqs'].shape == (2, 2, 2, 8)  # (x/y, depth, heads, head_dim / 2)
  back = layout.to_ours(timm, model.cfg)
  assert sorted(back) == sorted(flat)
  for key in flat:
    np.testing.assert_array_equal(back[key], flat[key], err_msg=key)


# -- rotary maths against timm's formulas (NumPy, written from timm's description) --------------------
def timm_rotate(x, angles):
  """timm's apply_rot_embed_cat: x * cos + rot(x) * sin, sin/cos repeated per channel pair and
  rot(x) = (-x1, x0, -x3, x2, ...)."""
  sin, cos = np.repeat(np.sin(angles), 2, -1), np.repeat(np.cos(angles), 2, -1)
  rot = np.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
  return x * cos + rot * sin


def test_rotation_matches_timm():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
  angles = rng.uniform(-7, 7, size=(3, 5, 4)).astype(np.float32)
  got = rope.rotate(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles))
  np.testing.assert_allclose(got, timm_rotate(x, angles), rtol=1e-5, atol=1e-5)


def test_angles_follow_timms_xy_grid_on_a_non_square_grid():
  model = tiny(depth=3)
  freqs = np.asarray(model.rope.freqs[...])
  h, w = 2, 3
  # timm's get_mixed_grid with 'xy': meshgrid(arange(w), arange(h), indexing='xy') -> x = column, y = row.
  t_x, t_y = (g.reshape(-1).astype(np.float32) for g in np.meshgrid(np.arange(w), np.arange(h), indexing='xy'))
  want = t_x[:, None] * freqs[0][:, :, None, :] + t_y[:, None] * freqs[1][:, :, None, :]
  np.testing.assert_allclose(model.rope.angles((h, w)), want, rtol=1e-6)


def test_init_as_timm_eva():
  model = tiny(depth=3, init_values=1e-4)
  freqs = np.asarray(model.rope.freqs[...])  # (2, depth, heads, 8): magnitudes 10^(-4m/16) at two right angles
  mag = 10.0 ** -(np.arange(0, 16, 4) / 16)
  np.testing.assert_allclose(np.hypot(freqs[0], freqs[1]), np.broadcast_to(np.tile(mag, 2), (3, 2, 8)), rtol=1e-5)
  np.testing.assert_allclose((freqs[0, ..., :4] * freqs[0, ..., 4:] + freqs[1, ..., :4] * freqs[1, ..., 4:]),
                             0.0, atol=1e-6)
  for blk in model.blocks:
    np.testing.assert_array_equal(blk.gamma_1[...], np.full(32, 1e-4, np.float32))
    np.testing.assert_array_equal(blk.gamma_2[...], np.full(32, 1e-4, np.float32))
  # Output kernels shrink with depth (timm's fix_init_weight: / sqrt(2 * block number)); the head by 1e-3.
  stds = [float(np.std(b.attn.proj.kernel[...])) for b in model.blocks]
  assert stds[0] > stds[1] > stds[2] and 0.01 < stds[0] < 0.02
  assert float(np.std(model.head.kernel[...])) < 1e-4
  assert float(np.std(model.cls_token[...])) > 0.005  # Eva: truncated normal 0.02, not ViT's 1e-6


def test_features_and_logits_at_another_grid():
  model = tiny()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 48, 64, 3)), jnp.float32)
  logits, feats = FORWARD(model, x)
  assert logits.shape == (2, 5) and feats.shape == (2, 3, 4, 32)
  assert [f.shape for f in model.features(x, layers=[0, -1])] == [(2, 3, 4, 32)] * 2


# -- config and sharding --------------------------------------------------------------------------------
@pytest.mark.parametrize('overrides, message', [
    (dict(width=36, num_heads=2), 'head dim 36/2 must be a multiple of 4'),
    (dict(gaug_impl='flash'), "gaug_impl='flash'"),
    (dict(img_size=40), 'img_size=(40, 40) must be a multiple of patch_size=16'),
])
def test_bad_config_is_one_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    rope.model_config('locatvit_tiny_rope_mixed', **overrides)


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown model name 'locatvit_small_rope_mixed'.*locatvit_tiny_rope_mixed"):
    rope.model_config('locatvit_small_rope_mixed')


def test_sharding_rules_name_the_rope_parameters():
  """rope/freqs and the layer scales have rules of their own, not the catch-all."""
  params = loading.flatten(loading.get_params(tiny()))
  for path, pattern in (('rope/freqs', r'.*rope/freqs$'), ('blocks/0/gamma_1', r'.*gamma_[12]$'),
                        ('blocks/1/gamma_2', r'.*gamma_[12]$')):
    assert path in params and sharding.rule_for(path)[0] == pattern, path


def test_decay_mask_is_timms_rule_on_the_authors_names(state, parity_model):
  """timm's param_groups_weight_decay: no decay for ndim <= 1, '.bias' and Eva's no_weight_decay()
  (pos_embed, cls_token and the rotary embedding's `freqs`)."""
  nwd = {'pos_embed', 'cls_token', 'rope.freqs'}
  ours = loading.flatten(optim.decay_mask(loading.get_params(parity_model)))
  for key, tensor in state.items():
    (path,) = layout.to_ours({key: tensor}, parity_model.cfg)
    assert ours[path] == (not (tensor.ndim <= 1 or key.endswith('.bias') or key in nwd)), key


# -- training -------------------------------------------------------------------------------------------
def test_sharded_training_matches_one_device(tmp_path, image_folder):
  """A 2-block RoPE model through the classification trainer: the same losses on one device and on
  data 2 x fsdp 2 x tensor 2, GAug statistics per block, and an export that loads as this family."""
  config = tiny_classification_config(str(image_folder), total_steps=3, checkpoint_every=3,
                                      **{'mixup.group_size': 2})
  config.model_name = 'vit_tiny_rope_mixed'
  config.model = common.model_fields(config.model_name, 'locat')
  config.model.update(dict(img_size=32, width=32, depth=2, num_heads=2, mlp_dim=64, drop_path=0.1))
  classification.train_and_evaluate(config, str(tmp_path / 'single'), devices=jax.devices()[:1])
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  classification.train_and_evaluate(config, str(tmp_path / 'sharded'))
  rows = {run: metrics.read_metrics(tmp_path / run) for run in ('single', 'sharded')}
  assert {'gaug_var/block0', 'gaug_alpha/block1'} <= set(rows['sharded'][0])
  a, b = ([r['loss'] for r in rows[run]] for run in ('single', 'sharded'))
  assert len(a) == len(b) == 3
  np.testing.assert_allclose(a, b, rtol=1e-5)
  model = loading.load(tmp_path / 'sharded' / 'export')
  assert model.cfg == classification.model_config(config)


@pytest.mark.parametrize('config, arg, want', [
    ('rope_ti', None, dict(width=192, num_heads=3, drop_path=0.1, gaug=True, prr=True)),
    ('rope_ti', 'vit', dict(width=192, drop_path=0.1, gaug=False, prr=False)),
    ('rope_b', None, dict(width=768, num_heads=12, mlp_dim=3072, drop_path=0.4, gaug=True, prr=True)),
])
def test_configs_are_the_authors_recipe(config, arg, want):
  import importlib
  c = importlib.import_module(f'locatvit_jax.configs.{config}').get_config(arg)
  cfg = classification.model_config(c)
  assert cfg.FAMILY == 'rope' and {k: getattr(cfg, k) for k in want} == want
  assert (cfg.init_values, cfg.rope_temperature, cfg.img_size) == (1e-5, 10.0, (224, 224))
  assert (tuple(c.aug.mean), tuple(c.aug.std)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
