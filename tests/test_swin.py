"""Swin family: the authors' LocAt Swin reproduced (parity folder), its timm layout both ways, timm's
window/shift/padding rules against independent NumPy, the attention implementations against each other
inside the model, config errors, and GAug statistics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import locatvit_jax
from locatvit_jax import convert, loading, metrics
from locatvit_jax.configs import common
from locatvit_jax.layouts import swin as swin_layout
from locatvit_jax.models import registry, swin
from locatvit_jax.train import classification
from tests.conftest import shared_fixture, tiny_classification_config

FULL_FLOAT32 = jax.default_matmul_precision('highest')
# 2 stages at 56 px: stage grids 14 and 7, windows 7 and 7, stage 0's odd blocks shift by 3 (mask on),
# stage 1's grid fits one window (no shift), as Swin-T's last stage at 224.
TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), img_size=56, num_classes=5, drop_path=0.0)


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


@pytest.fixture(scope='module')
def parity():
  d = shared_fixture('parity', 'locatswin_random')
  return d, locatvit_jax.load(str(d)), np.load(d / 'reference.npz'), load_file(str(d / 'model.safetensors'))


def tiny_model(seed=0, **overrides):
  return registry.create_model('locatswin_tiny', seed=seed, **dict(TINY, **overrides))


# -- the authors' model ----------------------------------------------------------------------------
def test_parity_logits_and_features(parity):
  """The authors' random-init LocAt Swin (width 48, depths 2-2-2-2): logits (final norm, PRR, pooling,
  head) and the last stage's map before the final norm, at 224."""
  _, model, ref, _ = parity
  assert isinstance(model, swin.SwinTransformer) and model.cfg.gaug and model.cfg.prr
  with FULL_FLOAT32:
    logits, features = nnx.jit(lambda m, x: (m(x), m.features(x)))(model, ref['images_224'])
  assert features.shape == ref['features_224'].shape == (2, 7, 7, 384)
  errors = rel_err(logits, ref['logits_224']), rel_err(features, ref['features_224'])
  print(f'locatswin_random: logits {errors[0]:.2e}, features {errors[1]:.2e} relative')
  assert max(errors) <= 1e-4


def test_layout_reads_the_parity_folder(parity):
  d, model, _, state = parity
  hf = json.loads((d / 'config.json').read_text())
  assert swin_layout.claims(state, hf) and swin_layout.claims(state, {})
  cfg = swin_layout.config(swin_layout.fields(state, hf), state)
  assert cfg == model.cfg
  assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.num_classes) == (
      48, (2, 2, 2, 2), (2, 4, 6, 12), 7, 10)


def test_timm_round_trip_is_bit_identical(parity):
  """timm -> ours (the loaded model's params) -> timm gives the file's tensors, bit for bit."""
  _, model, _, state = parity
  back = convert.timm_state(model)
  assert sorted(back) == sorted(state)
  for key, tensor in state.items():
    assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
    assert np.array_equal(back[key].view(np.uint32), tensor.view(np.uint32)), key


def test_buffers_of_older_checkpoints_are_dropped(parity):
  _, model, _, state = parity
  with_buffers = dict(state, **{'layers.0.blocks.1.attn_mask': np.zeros((64, 49, 49), np.float32),
                                'layers.0.blocks.1.attn.relative_position_index': np.zeros((49, 49), np.int64)})
  assert sorted(swin_layout.to_ours(with_buffers, model.cfg)) == sorted(swin_layout.to_ours(state, model.cfg))


@pytest.mark.parametrize('variant', sorted(swin.VARIANTS))
def test_ours_to_timm_to_ours_and_config_json(variant, tmp_path):
  """A model of ours -> the authors' folder (model.safetensors + config.json) -> load(): the same config,
  the same parameters bit for bit."""
  model = tiny_model(**swin.VARIANTS[variant])
  convert.write_hf(model, tmp_path)
  hf = json.loads((tmp_path / 'config.json').read_text())
  assert hf['architecture'] == ('locatswin_tiny' if variant != 'vit' else 'swin_tiny_patch4_window7_224')
  back = locatvit_jax.load(str(tmp_path))
  assert back.cfg == model.cfg
  flat, flat_back = (loading.flatten(jax.tree.map(np.asarray, loading.get_params(m))) for m in (model, back))
  assert sorted(flat) == sorted(flat_back)
  assert all(np.array_equal(flat[k], flat_back[k]) for k in flat)


def test_names_and_aliases():
  assert registry.model_config('swin_tiny_patch4_window7_224') == registry.model_config('swin_tiny')
  t, b = registry.model_config('locatswin_tiny'), registry.model_config('swin_base')
  assert (t.embed_dim, t.depths, t.num_heads, t.gaug, t.prr, t.drop_path) == (96, (2, 2, 6, 2), (3, 6, 12, 24),
                                                                              True, True, 0.1)
  assert (b.embed_dim, b.depths, b.num_heads, b.gaug, b.prr, b.drop_path) == (128, (2, 2, 18, 2), (4, 8, 16, 32),
                                                                              False, False, 0.4)
  assert (t.depth, t.feature_dim, t.feature_stride) == (12, 768, 32)
  with pytest.raises(ValueError, match="unknown model name 'swin_small'"):
    swin.model_config('swin_small')


# -- timm's window rules, against NumPy written from timm's definitions ------------------------------
@pytest.mark.parametrize('img_size, windows, shifts', [
    (224, [(7, 7)] * 4, [(3, 3)] * 3 + [(0, 0)]),  # grids 56, 28, 14, 7
    (64, [(7, 7), (7, 7), (4, 4), (2, 2)], [(3, 3), (3, 3), (0, 0), (0, 0)]),  # grids 16, 8, 4, 2
    ((32, 64), [(7, 7), (4, 7), (2, 4), (1, 2)], [(3, 3), (0, 3), (0, 0), (0, 0)]),  # grids 8x16, 4x8, ...
])
def test_window_and_shift_per_stage(img_size, windows, shifts):
  cfg = swin.SwinConfig(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1), img_size=img_size)
  assert [cfg.window_and_shift(i, shifted=True) for i in range(4)] == list(zip(windows, shifts))
  assert all(cfg.window_and_shift(i, shifted=False)[1] == (0, 0) for i in range(4))


def numpy_regions(padded, window, shift):
  """timm's region of each cell of the padded grid, per axis: bands [0, P - w), [P - w, P - s), [P - s, P);
  an axis with s = 0 is one band (timm's slice(-0, None) covers it whole)."""
  def bands(p, w, s):
    if s == 0:
      return np.zeros(p, int)
    y = np.arange(p)
    return np.where(y < p - w, 0, np.where(y < p - s, 1, 2))
  return bands(padded[0], window[0], shift[0])[:, None] * 3 + bands(padded[1], window[1], shift[1])[None, :]


@pytest.mark.parametrize('padded, window, shift', [((14, 14), (7, 7), (3, 3)), ((14, 21), (7, 7), (3, 3)),
                                                   ((8, 14), (4, 7), (0, 3))])
def test_shift_mask(padded, window, shift):
  regions = numpy_regions(padded, window, shift)
  wins = [regions[i:i + window[0], j:j + window[1]].reshape(-1)
          for i in range(0, padded[0], window[0]) for j in range(0, padded[1], window[1])]
  expected = np.stack([np.where(w[:, None] == w[None, :], 0.0, -100.0) for w in wins])
  np.testing.assert_array_equal(swin.shift_mask(padded, window, shift), expected)


def test_relative_position_index():
  wh, ww = 3, 4
  idx = swin.relative_position_index((wh, ww))
  for a in range(wh * ww):
    for b in range(wh * ww):
      (ra, ca), (rb, cb) = divmod(a, ww), divmod(b, ww)
      assert idx[a, b] == (ra - rb + wh - 1) * (2 * ww - 1) + (ca - cb + ww - 1)


def numpy_window_attention(x, attn, window, shift):
  """timm's (shifted) window attention with GAug, written out per window in float64: roll, zero-pad to
  whole windows, per-window softmax(q k^T / sqrt(d) + relative bias + region mask + S) v, proj, crop,
  roll back. x: (B, H, W, C), already normed."""
  p = lambda v: np.asarray(v[...], np.float64)
  b, h, w, c = x.shape
  heads = attn.num_heads
  d = c // heads
  x = np.roll(np.asarray(x, np.float64), (-shift[0], -shift[1]), axis=(1, 2))
  ph, pw = -(-h // window[0]) * window[0], -(-w // window[1]) * window[1]
  x = np.pad(x, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
  qkv = (x @ p(attn.qkv.kernel) + p(attn.qkv.bias)).reshape(b, ph, pw, 3, heads, d)
  regions = numpy_regions((ph, pw), window, shift)
  table, geometry = p(attn.relative_position_bias_table), attn.geometry
  out = np.zeros((b, ph, pw, heads, d))
  for i0 in range(0, ph, window[0]):
    for j0 in range(0, pw, window[1]):
      cells = [(i0 + i, j0 + j) for i in range(window[0]) for j in range(window[1])]
      q, k, v = (np.stack([qkv[:, r, s, t] for r, s in cells], 1) for t in range(3))  # (B, N, heads, d)
      logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d)
      for a, (ra, sa) in enumerate(cells):
        for z, (rz, sz) in enumerate(cells):
          row = (ra - rz + window[0] - 1) * (2 * window[1] - 1) + (sa - sz + window[1] - 1)
          logits[:, :, a, z] += table[row]
          if any(shift) and regions[ra, sa] != regions[rz, sz]:
            logits[:, :, a, z] -= 100.0
      if attn.gaug is not None:
        z_var = q @ p(attn.gaug.var_proj.kernel) + p(attn.gaug.var_proj.bias)  # (B, N, heads, 2)
        c_max = geometry.var_max
        var = c_max / (1 + np.exp(-(z_var - np.log(c_max - 1))))
        alpha = np.log1p(np.exp(q @ p(attn.gaug.alpha_proj.kernel) + p(attn.gaug.alpha_proj.bias)))[..., 0]
        pos = np.array([(r - i0, s - j0) for r, s in cells], np.float64)
        dist = (pos[:, None, :] - pos[None, :, :]) ** 2  # (N, N, 2), within a window: no clamp
        g = np.exp(-0.5 * np.sum(dist[None, :, :, None, :] / (var[:, :, None] + geometry.eps), -1))
        logits += np.transpose(alpha[:, :, None] * g, (0, 3, 1, 2))
      prob = np.exp(logits - logits.max(-1, keepdims=True))
      o = np.einsum('bhqk,bkhd->bqhd', prob / prob.sum(-1, keepdims=True), v)
      for a, (r, s) in enumerate(cells):
        out[:, r, s] = o[:, a]
  out = out.reshape(b, ph, pw, c) @ p(attn.proj.kernel) + p(attn.proj.bias)
  return np.roll(out[:, :h, :w], shift, axis=(1, 2))


@pytest.mark.parametrize('block_index, size', [(1, (9, 10)), (0, (9, 10)), (1, (14, 14))])
def test_window_attention_against_numpy(block_index, size):
  """Stage 0 of a model built at 32 px (grid 8: window 7, shift 3) run on other grids: the map is
  padded to whole windows after the shift and the mask cut on the padded grid, as timm's dynamic
  mask does; 14 x 14 needs no padding."""
  model = tiny_model(img_size=32, depths=(2,), num_heads=(2,))
  blk = model.layers[0].blocks[block_index]
  assert (blk.window, blk.shift) == ((7, 7), (3, 3) if block_index else (0, 0))
  x = np.random.default_rng(0).normal(size=(2,) + size + (16,)).astype(np.float32)
  with FULL_FLOAT32:
    got = blk._window_attention(jnp.asarray(x))
  assert rel_err(got, numpy_window_attention(x, blk.attn, blk.window, blk.shift)) < 1e-5


# -- the model ------------------------------------------------------------------------------------
def test_features_and_other_input_sizes():
  """Stage maps at strides 4 and 8; an input size other than the built one is padded (to whole patches,
  windows and merged pairs), as the authors' segmentation backbone runs (strict_img_size=False)."""
  model = tiny_model()
  x = np.random.default_rng(0).normal(size=(1, 56, 56, 3)).astype(np.float32)
  maps, last, logits, pooled = nnx.jit(lambda m, x: (m.features(x, layers=[0, -1]), m.features(x), m(x),
                                                     m.pooled_features(x)))(model, x)
  assert [m.shape for m in maps] == [(1, 14, 14, 16), (1, 7, 7, 32)]
  np.testing.assert_array_equal(last, maps[1])
  assert model.cfg.feature_stride == 8 and model.cfg.feature_dim == 32
  assert logits.shape == (1, 5) and pooled.shape == (1, 32)
  # 17 x 23 patches -> 9 x 12 after merging
  odd = nnx.jit(lambda m, x: m.features(x))(model, np.ones((1, 66, 90, 3), np.float32))
  assert odd.shape == (1, 9, 12, 32) and np.all(np.isfinite(odd))
  with pytest.raises(ValueError, match=r'layers \[2\]; expected stage indices in -2..1'):
    model.features(x, layers=[2])
  with pytest.raises(ValueError, match=r'images of shape \(1, 56, 56\); expected \(batch, height, width, 3\)'):
    model(x[..., 0])


def test_attention_implementations_agree_in_the_model():
  """dense, fused and blockwise: the same logits and parameter gradients, the relative position tables'
  included (they get the extra bias' gradient)."""
  model = tiny_model(seed=1)
  x = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)

  def grads(impl):
    model.set_attributes(gaug_impl=impl)
    loss = lambda m: jnp.sum(m(x) ** 2)
    with FULL_FLOAT32:
      value, g = nnx.jit(nnx.value_and_grad(loss))(model)
    return value, loading.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(g)))

  ref_value, ref = grads('dense')
  table = ref['layers/0/blocks/1/attn/relative_position_bias_table']
  assert np.max(np.abs(table)) > 0
  for impl in ('fused', 'blockwise'):
    value, g = grads(impl)
    assert abs(value - ref_value) <= 1e-5 * abs(ref_value)
    for k in ref:
      assert rel_err(g[k], ref[k]) < 1e-4, (impl, k)


def test_gaug_statistics_are_sown_per_block():
  model = tiny_model()
  model.set_attributes(collect_stats=True)
  nnx.jit(lambda m, x: m(x))(model, np.zeros((1, 56, 56, 3), np.float32))
  stats = loading.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Intermediate)))
  assert sorted(stats) == sorted(f'layers/{i}/blocks/{j}/attn/gaug_{s}' for i in (0, 1) for j in (0, 1)
                                 for s in ('alpha', 'var'))


@pytest.mark.parametrize('overrides, message', [
    (dict(depths=(2, 2), num_heads=(1,)), r'depths=\(2, 2\) and num_heads=\(1,\); expected one entry per stage'),
    (dict(embed_dim=16, num_heads=(3, 2)), r'stage widths \(16, 32\) must be multiples of num_heads=\(3, 2\)'),
    (dict(img_size=58), r'img_size=\(58, 58\) must be a multiple of patch_size=4'),
    (dict(window_size=0), r'window_size=0; expected > 0'),
    (dict(gaug_impl='pallas'), r"gaug_impl='pallas' takes no relative position bias"),
    (dict(gaug_impl='flash'), r"gaug_impl='flash'; expected one of"),
    (dict(drop_path=1.0), r'drop_path=1.0; expected 0 <= drop_path < 1'),
])
def test_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    swin.model_config('locatswin_tiny', **dict(TINY, **overrides))


# -- training ---------------------------------------------------------------------------------------
def test_two_block_swin_trains_sharded_as_on_one_device(tmp_path, image_folder):
  """One stage of 2 blocks (the second shifted: 32 px gives an 8 x 8 grid, padded to 14 x 14 windows)
  with GAug and PRR: 3 steps on data 2 x fsdp 2 x tensor 2 give one device's losses."""
  config = tiny_classification_config(str(image_folder), total_steps=3, checkpoint_every=3,
                                      **{'mixup.group_size': 2})
  config.model_name = 'locatswin_tiny'
  config.model = common.model_fields('locatswin_tiny', 'locat')
  config.model.update(dict(embed_dim=16, depths=(2,), num_heads=(2,), img_size=32, drop_path=0.1))
  config.aug.mean, config.aug.std = swin.NORMALIZATION
  losses = {}
  for name, mesh, devices in (('single', dict(data=-1, fsdp=1, tensor=1), jax.devices()[:1]),
                              ('sharded', dict(data=2, fsdp=2, tensor=2), None)):
    config.mesh.update(mesh)
    classification.train_and_evaluate(config, str(tmp_path / name), devices=devices)
    losses[name] = {r['step']: r['loss'] for r in metrics.read_metrics(tmp_path / name)}
  assert losses['single'].keys() == losses['sharded'].keys() == {1, 2, 3}
  np.testing.assert_allclose([losses['single'][s] for s in (1, 2, 3)], [losses['sharded'][s] for s in (1, 2, 3)],
                             rtol=1e-5, atol=1e-6)
  assert isinstance(locatvit_jax.load(tmp_path / 'sharded' / 'export'), swin.SwinTransformer)
