"""Jumbo and LocAt Jumbo: parity with the authors' code, the shared MLP held (and trained) once, the timm
layout both ways, decay and sharding of the new parameters, and training on a mesh."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import locatvit_jax
from locatvit_jax import convert, loading, metrics, sharding
from locatvit_jax.configs import jumbo_ti
from locatvit_jax.layouts import jumbo as layout
from locatvit_jax.models import jumbo
from locatvit_jax.train import classification, optim
from tests.conftest import shared_fixture

TINY = dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=8, img_size=32, num_classes=10)


def rel_err(a, ref):
  return float(np.max(np.abs(np.asarray(a) - ref)) / np.max(np.abs(ref)))


# -- the authors' random-init checkpoint -------------------------------------------------------------------
@pytest.fixture(scope='module')
def parity():
  d = shared_fixture('parity', 'locatjumbo_random')
  state = load_file(d / 'model.safetensors')
  model = locatvit_jax.load(d)  # config.json + model.safetensors, the family found by the layouts
  ref = dict(np.load(d / 'reference.npz'))
  run = nnx.jit(lambda m, x: (m(x), m.features(x), m.features(x, layers=[0, -1])))
  out = {size: run(model, jnp.asarray(ref[f'images_{size}'])) for size in ('224', 'dyn')}
  return dict(dir=d, state=state, cfg=model.cfg, model=model, ref=ref, out=out)


def test_config_from_the_authors_files(parity):
  cfg = parity['cfg']
  assert isinstance(parity['model'], jumbo.Jumbo)
  # The layout alone, without load(), reads the same config and builds the same model.
  state, hf = parity['state'], json.loads((parity['dir'] / 'config.json').read_text())
  assert layout.config(layout.fields(state, hf), state) == cfg
  direct = loading.build_model(cfg, layout.to_ours(state, cfg))
  jax.tree.map(np.testing.assert_array_equal, locatvit_jax.get_params(direct), locatvit_jax.get_params(parity['model']))
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.num_class_tokens, cfg.num_classes) == (64, 3, 2, 256, 6, 100)
  assert cfg.gaug and cfg.prr and cfg.img_size == (224, 224) and cfg.jumbo_mlp_ratio == 4


@pytest.mark.parametrize('size', ['224', 'dyn'])
def test_logits_and_features_match_the_authors(parity, size):
  logits, features, (first, last) = parity['out'][size]
  ref = parity['ref']
  assert features.shape == ref[f'features_{size}'].shape  # (B, h, w, C): patch tokens only
  assert rel_err(logits, ref[f'logits_{size}']) <= 1e-4
  assert rel_err(features, ref[f'features_{size}']) <= 1e-4
  np.testing.assert_array_equal(np.asarray(last), np.asarray(features))
  assert first.shape == features.shape and not np.allclose(first, features)


def assert_bit_identical(got, want):
  assert got.keys() == want.keys()
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k


def test_timm_round_trip_is_bit_exact(parity, tmp_path):
  state, cfg = parity['state'], parity['cfg']
  assert_bit_identical(layout.to_timm(layout.to_ours(state, cfg), cfg), state)
  # The command line both ways: the authors' folder -> our Orbax export -> their layout.
  assert convert.main([str(parity['dir']), str(tmp_path / 'ours')]) == 0
  assert convert.main([str(tmp_path / 'ours'), str(tmp_path / 'back.safetensors'), '--to-timm']) == 0
  assert_bit_identical(load_file(tmp_path / 'back.safetensors'), state)
  assert locatvit_jax.load(tmp_path / 'ours').cfg == cfg


def test_shared_mlp_copies_must_be_equal(parity):
  state = dict(parity['state'])
  state['blocks.1.jumbo_mlp.fc2.bias'] = state['blocks.1.jumbo_mlp.fc2.bias'] + 1e-7
  with pytest.raises(ValueError, match=r'^blocks\.1\.jumbo_mlp\.fc2\.bias differs from jumbo_mlp\.fc2\.bias: '
                     'the Jumbo MLP is one module shared by every block'):
    layout.to_ours(state, parity['cfg'])


def test_params_hold_the_shared_mlp_once(parity):
  params = loading.flatten(nnx.to_pure_dict(nnx.state(parity['model'], nnx.Param)))
  assert sorted(k for k in params if 'jumbo_mlp' in k) == [
      'jumbo_mlp/fc1/bias', 'jumbo_mlp/fc1/kernel', 'jumbo_mlp/fc2/bias', 'jumbo_mlp/fc2/kernel']
  # As many numbers as PyTorch's parameters(), which lists a shared module once.
  unique = {k: v for k, v in parity['state'].items() if not k.startswith('blocks.') or '.jumbo_mlp.' not in k}
  assert sum(v.size for v in params.values()) == sum(v.size for v in unique.values())


# -- a tiny model ----------------------------------------------------------------------------------------
def test_init_is_the_authors():
  model = jumbo.Jumbo(jumbo.JumboConfig(**TINY), rngs=nnx.Rngs(0))
  assert np.all(model.head.kernel[...] == 0)
  np.testing.assert_allclose(model.head.bias[...], -math.log(10))  # the authors: 1/num_classes
  assert float(jumbo.head_bias(100)) == -4.6 and jumbo.head_bias(1000) == -6.9
  for blk in model.blocks:
    for ls in (blk.ls1, blk.ls2, blk.ls3):
      assert np.all(ls.gamma[...] == np.float32(1e-4))
  assert model.cls_token.shape == (1, 6, 16) and 0.01 < float(np.std(model.cls_token[...])) < 0.03
  assert model.pos_embed.shape == (1, 16, 16)  # no rows for the class tokens
  assert jumbo.Jumbo(jumbo.JumboConfig(**TINY, prr=False), rngs=nnx.Rngs(0)).norm_patches is None


def test_shared_mlp_gradient_is_the_sum_of_every_blocks_use():
  cfg = jumbo.JumboConfig(**TINY)
  model = jumbo.Jumbo(cfg, rngs=nnx.Rngs(1))
  model.head.kernel[...] = jax.random.normal(jax.random.key(2), model.head.kernel.shape)  # zero at init
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  w = jax.random.normal(jax.random.key(1), (2, 10))

  def loss(m):
    return jnp.sum(m(x) * w)

  tied = nnx.grad(loss)(model)

  class OnePerCall(nnx.Module):
    """A separate copy of the MLP for each call: block i uses copies[i]."""

    def __init__(self, mlp, n):
      self.copies = nnx.List([nnx.clone(mlp) for _ in range(n)])
      self.calls = 0

    def __call__(self, y):
      out = self.copies[self.calls % len(self.copies)](y)
      self.calls += 1
      return out

  untied_model = nnx.clone(model)
  untied_model.jumbo_mlp = OnePerCall(model.jumbo_mlp, cfg.depth)
  untied = nnx.grad(loss)(untied_model)
  assert untied_model.jumbo_mlp.calls == cfg.depth
  per_block = [nnx.to_pure_dict(untied.jumbo_mlp.copies[i]) for i in range(cfg.depth)]
  summed = jax.tree.map(lambda *g: sum(g), *per_block)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(per_block))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               nnx.to_pure_dict(tied.jumbo_mlp), summed)


def test_decay_mask_is_timms_rule_on_the_authors_names(parity):
  # timm's param_groups_weight_decay: no decay for ndim <= 1, '.bias' and the model's no_weight_decay();
  # PyTorch's named_parameters() lists the shared MLP once.
  nwd = {'pos_embed', 'cls_token', 'dist_token'}
  decays = {k: not (v.ndim <= 1 or k.endswith('.bias') or k in nwd) for k, v in parity['state'].items()}
  ours = loading.flatten(optim.decay_mask(nnx.to_pure_dict(nnx.state(parity['model'], nnx.Param))))
  for key, decayed in decays.items():
    if key.startswith('blocks.') and '.jumbo_mlp.' in key:
      continue
    (path,) = layout.to_ours({key: parity['state'][key]}, parity['cfg'])
    assert ours[path] == decayed, key
  assert ours['jumbo_mlp/fc1/kernel'] and not ours['blocks/0/ls3/gamma'] and not ours['norm_patches/scale']


def test_sharding_of_the_new_parameters():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model = nnx.eval_shape(lambda: jumbo.Jumbo(jumbo.JumboConfig(**TINY), rngs=nnx.Rngs(0)))
  specs = loading.flatten(jax.tree.map(lambda s: s.spec, nnx.to_pure_dict(
      sharding.tree_shardings(nnx.state(model, nnx.Param), mesh))))
  P = jax.sharding.PartitionSpec
  # The wide MLP is split like a block's: fc1's outputs and fc2's inputs over `tensor`.
  assert specs['jumbo_mlp/fc1/kernel'] == P('fsdp', 'tensor') and specs['jumbo_mlp/fc2/kernel'] == P('tensor', 'fsdp')
  assert specs['jumbo_mlp/fc1/bias'] == P('tensor')
  for replicated in ('blocks/0/ls1/gamma', 'blocks/0/ls3/gamma', 'norm_patches/scale', 'blocks/1/norm3/scale',
                     'cls_token'):
    assert all(axis is None for axis in specs[replicated]), replicated
  assert specs['pos_embed'] == P(None, None, 'fsdp')


# -- names, configs, config.json -------------------------------------------------------------------------
def test_names_and_bad_values():
  cfg = jumbo.model_config('locatjumbo_base')
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.drop_path, cfg.gaug, cfg.prr) == (
      768, 12, 12, 3072, 0.4, True, True)
  base = jumbo.model_config('jumbo_tiny')
  assert (base.width, base.drop_path, base.gaug, base.prr) == (192, 0.1, False, False)
  with pytest.raises(ValueError, match=r"^unknown model name 'jumbo_small'; expected one of \('jumbo_tiny'"):
    jumbo.model_config('jumbo_small')
  with pytest.raises(ValueError, match=r'^num_class_tokens=0; expected > 0$'):
    jumbo.JumboConfig(num_class_tokens=0)
  with pytest.raises(ValueError, match=r"^a 'vit' model record given to the 'jumbo' family's config$"):
    jumbo.JumboConfig.from_dict({'family': 'vit'})


@pytest.mark.parametrize('variant', ['locat', 'vit', 'gaug'])
def test_config_json_and_tensors_give_back_the_config(variant):
  # init_values: only config.json tells it (a trained gamma is not its initial value).
  cfg = jumbo.JumboConfig(**TINY, init_values=1e-5, **jumbo.VARIANTS[variant])
  model = nnx.eval_shape(lambda: jumbo.Jumbo(cfg, rngs=nnx.Rngs(0)))
  flat = loading.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  state = layout.to_timm({k: np.zeros(v.shape, v.dtype) for k, v in flat.items()}, cfg)
  hf = json.loads(json.dumps(layout.hf_config(cfg)))
  assert layout.claims(state, {}) and layout.claims({}, hf)
  assert layout.config(layout.fields(state, hf), state) == cfg
  assert hf['architecture'] == ('jumbo_tiny' if variant == 'vit' else 'locatjumbo_tiny')
  # The authors' baseline has neither GAug layers nor norm_patches; each block lists the shared MLP.
  assert ('norm_patches.weight' in state) == cfg.prr
  assert ('blocks.0.attn.gaug.log_var.weight' in state) == cfg.gaug
  assert {f'blocks.{i}.jumbo_mlp.fc1.weight' for i in range(2)} <= state.keys()


# -- training -------------------------------------------------------------------------------------------
def tiny_jumbo_config(data_root, variant=None):
  """configs/jumbo_ti.py shrunk to seconds: width 32, depth 2, 32 px at patch 8, batch 8, 3 steps."""
  c = jumbo_ti.get_config(variant)
  c.model.update(dict(img_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, drop_path=0.1))
  c.data.update(dict(kind='folder', root=str(data_root), num_classes=4))
  c.aug.eval_resize = 36
  c.input.worker_count = 0
  c.batch_size = c.eval_batch_size = 8
  c.total_steps, c.warmup_steps = 3, 1
  c.optim.update(dict(lr=1e-3, lr_base_batch=8, warmup_init_lr=0.0, end_lr=0.0))
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 3
  c.export_best = False
  c.mixup.group_size = 2  # mixup groups are per device: 2 images on both meshes below
  return c


def test_sharded_training_matches_single_device(tmp_path, image_folder):
  config = tiny_jumbo_config(image_folder)
  single = tmp_path / 'single'
  classification.train_and_evaluate(config, str(single), devices=jax.devices()[:1])
  # Batch over data x fsdp, parameters (the wide shared MLP included) over fsdp and tensor.
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  sharded = tmp_path / 'sharded'
  classification.train_and_evaluate(config, str(sharded))
  rows = {run: metrics.read_metrics(run) for run in (single, sharded)}
  a, b = ({r['step']: r['loss'] for r in rows[run]} for run in (single, sharded))
  assert a.keys() == b.keys() == {1, 2, 3}
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)
  assert {'gaug_var/block0', 'gaug_alpha/block1'} <= rows[sharded][0].keys()  # GAug statistics per block
  model = locatvit_jax.load(sharded / 'export')
  assert isinstance(model, jumbo.Jumbo) and model.cfg.depth == 2 and model.cfg.num_classes == 4
