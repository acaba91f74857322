"""The model: GAug against the spec's formulas, parameter counts, shapes, ablation switches, the
authors' variants (class token, registers, GAP, no position embedding) in values, errors."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import locatvit_jax
from locatvit_jax import loading
from locatvit_jax.configs import common
from locatvit_jax.models import locat, vit
from tests.conftest import shared_fixture

# Tiny widths keep every forward pass well under a second on CPU; head_dim 32, not 64.
TINY = dict(width=64, depth=2, num_heads=2, mlp_dim=128, drop_path=0.0)
FORWARD = nnx.jit(lambda model, images: (model(images), model.features(images)))


def images(batch, height, width, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def tiny_model(seed=0, **overrides):
  return locatvit_jax.create_model('locatvit_ti16', num_classes=7, seed=seed, **{**TINY, **overrides})


def rebuild(model, **overrides):
  """A model of the same parameters with other config fields (dtype, remat, drop path, PRR)."""
  return loading.build_model(dataclasses.replace(model.cfg, **overrides), loading.get_params(model))


# -- GAug against a direct NumPy computation of spec section 2 ---------------------------------------
def gaug_numpy(q, var_kernel, var_bias, alpha_kernel, alpha_bias, grid0, grid):
  """Steps 1-3 of the spec in float64: var (..., 2) and alpha (...)."""
  c = max(grid0) ** 2
  z = q @ var_kernel + var_bias - np.log(c - 1)
  var = c / (1 + np.exp(-z))
  if tuple(grid) != tuple(grid0):
    var = var * min(grid) / min(grid0)
  alpha = np.log1p(np.exp(q @ alpha_kernel + alpha_bias))[..., 0]
  return var, alpha


def squared_distances(grid, grid0):
  """The spec's (hw, hw, 2) per-axis squared distances between patches, clamped at (side0 - 1)^2."""
  h, w = grid
  pos = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing='ij'), -1).reshape(h * w, 2)
  return np.minimum((pos[:, None, :] - pos[None, :, :]) ** 2, (max(grid0) - 1) ** 2)


def bias_numpy(var, alpha, grid, grid0, eps, num_prefix):
  """Steps 4-6 of the spec: the full (B, H, N, N) bias from the (N, N, 2) squared-distance tensor."""
  h, w = grid
  d = squared_distances(grid, grid0)
  g = np.exp(-np.sum(0.5 * d / (var[..., :, None, :] + eps), axis=-1))
  n = num_prefix + h * w
  s = np.zeros(var.shape[:2] + (n, n))
  s[..., num_prefix:, num_prefix:] = alpha[..., None] * g
  return s


def random_gaug(head_dim, grid0, seed=0):
  """A GAug whose layers are drawn large, so that var and alpha spread over their ranges."""
  gaug = locat.GAug(head_dim, locat.GAugGeometry(grid0), rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for layer in (gaug.var_proj, gaug.alpha_proj):
    layer.kernel[...] = rng.normal(0, 0.3, layer.kernel.shape).astype(np.float32)
    layer.bias[...] = rng.normal(0, 1.0, layer.bias.shape).astype(np.float32)
  return gaug


def random_var_alpha(grid, seed=0):
  rng = np.random.default_rng(seed)
  hw = grid[0] * grid[1]
  var = np.exp(rng.uniform(-3, 4, (2, 3, hw, 2))).astype(np.float32)  # 0.05 .. 55 patches^2
  alpha = rng.uniform(0, 3, (2, 3, hw)).astype(np.float32)
  return var, alpha


def gaug_of_queries(gaug, q, grid, num_prefix=0):
  """GAug's maps of given queries q (B, H, N, d): the queries as the input, an identity projection."""
  b, h, n, d = q.shape
  x = jnp.asarray(q).transpose(0, 2, 1, 3).reshape(b, n, h * d)
  return gaug(x, jnp.eye(h * d), jnp.zeros(h * d), h, grid, num_prefix)


@pytest.mark.parametrize('grid, num_prefix', [((14, 14), 0), ((10, 18), 1), ((20, 24), 5)])
def test_gaug_module_matches_the_spec_formula(grid, num_prefix):
  """From the attention's input x (B, N, C) and its query projection (C = 3 heads x 16): the spec's
  maps of q = x W_q + b_q, q computed here in float64."""
  gaug = random_gaug(16, (14, 14))
  rng = np.random.default_rng(1)
  x = rng.normal(0, 1, (2, num_prefix + grid[0] * grid[1], 48)).astype(np.float32)
  q_kernel = rng.normal(0, 0.3, (48, 48)).astype(np.float32)
  q_bias = rng.normal(0, 0.5, (48,)).astype(np.float32)
  var, alpha = gaug(jnp.asarray(x), q_kernel, q_bias, 3, grid, num_prefix)  # prefix rows dropped
  q = (x.astype(np.float64) @ q_kernel + q_bias).reshape(2, -1, 3, 16).transpose(0, 2, 1, 3)[:, :, num_prefix:]
  weights = [np.asarray(p[...], np.float64) for p in (
      gaug.var_proj.kernel, gaug.var_proj.bias, gaug.alpha_proj.kernel, gaug.alpha_proj.bias)]
  want_var, want_alpha = gaug_numpy(q, *weights, (14, 14), grid)
  np.testing.assert_allclose(var, want_var, rtol=2e-5)
  np.testing.assert_allclose(alpha, want_alpha, rtol=2e-5, atol=1e-6)
  assert var.dtype == alpha.dtype == jnp.float32


def test_gaug_variance_follows_the_shorter_side_of_the_grid():
  gaug = random_gaug(16, (14, 14))
  q = np.random.default_rng(1).normal(0, 2, (1, 1, 12, 16)).astype(np.float32)  # same queries at every grid
  built, _ = gaug_of_queries(gaug, q, (14, 14))
  np.testing.assert_allclose(gaug_of_queries(gaug, q, (10, 18))[0], built * 10 / 14, rtol=1e-6)
  np.testing.assert_allclose(gaug_of_queries(gaug, q, (28, 21))[0], built * 21 / 14, rtol=1e-6)


@pytest.mark.parametrize('grid0', [(14, 14), (32, 32), (4, 6)])
def test_variance_is_one_patch_when_the_linear_output_is_zero(grid0):
  gaug = locat.GAug(8, locat.GAugGeometry(grid0), rngs=nnx.Rngs(0))
  gaug.var_proj.kernel[...] = jnp.zeros_like(gaug.var_proj.kernel[...])
  var, _ = gaug_of_queries(gaug, jnp.ones((1, 1, 5, 8)), grid0)
  np.testing.assert_allclose(var, 1.0, rtol=1e-6)


@pytest.mark.parametrize('grid0, eps', [((14, 14), 0.1), ((32, 32), 0.2), ((14, 32), 0.2), ((4, 4), 0.1)])
def test_kernel_eps(grid0, eps):
  assert locat.GAugGeometry(grid0).eps == pytest.approx(eps, rel=1e-12)


@pytest.mark.parametrize('grid0, grid, num_prefix', [
    ((4, 4), (4, 4), 1),  # the built grid
    ((4, 4), (3, 6), 5),  # class token + 4 registers, a smaller and non-square grid
    ((4, 4), (7, 5), 0),  # a larger grid: the distance clamp is active
    ((14, 14), (3, 4), 1),
])
def test_dense_bias_matches_the_spec_formula(grid0, grid, num_prefix):
  var, alpha = random_var_alpha(grid)
  geometry = locat.GAugGeometry(grid0)
  got = locat.dense_bias(var, alpha, grid, geometry, num_prefix)
  want = bias_numpy(var.astype(np.float64), alpha.astype(np.float64), grid, grid0, geometry.eps, num_prefix)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('grid0, grid', [((4, 4), (4, 4)), ((4, 4), (7, 5)), ((14, 14), (3, 4))])
def test_patch_bias_vjp_matches_the_spec_formula_derivatives(grid0, grid):
  # S_ij = alpha_i g_ij, g_ij = exp(-sum_a 0.5 d_ija / (var_ia + eps)): dS/dalpha_i = g_ij and
  # dS/dvar_ia = alpha_i g_ij 0.5 d_ija / (var_ia + eps)^2, contracted with ds in float64.
  var, alpha = random_var_alpha(grid)
  geometry = locat.GAugGeometry(grid0)
  ds = np.random.default_rng(1).normal(size=var.shape[:3] + var.shape[2:3]).astype(np.float32)
  dvar, dalpha = locat.patch_bias_vjp(jnp.asarray(ds), var, alpha, grid, geometry)
  d = squared_distances(grid, grid0)
  v = var.astype(np.float64)[..., :, None, :] + geometry.eps
  g = np.exp(-np.sum(0.5 * d / v, axis=-1))
  np.testing.assert_allclose(dalpha, np.sum(ds * g, axis=-1), rtol=1e-5, atol=1e-6)
  want_dvar = np.sum((ds * alpha[..., None] * g)[..., None] * 0.5 * d / v ** 2, axis=-2)
  np.testing.assert_allclose(dvar, want_dvar, rtol=1e-4, atol=1e-6)


def test_dense_bias_is_zero_on_prefix_tokens_and_between_zero_and_alpha():
  grid, p = (5, 6), 3
  var, alpha = random_var_alpha(grid)
  s = np.asarray(locat.dense_bias(var, alpha, grid, locat.GAugGeometry((14, 14)), p))
  assert s.shape == (2, 3, p + 30, p + 30)
  assert not s[..., :p, :].any() and not s[..., :, :p].any()
  patches = s[..., p:, p:]
  assert patches.min() >= 0 and (patches <= alpha[..., None]).all()
  np.testing.assert_array_equal(np.diagonal(patches, axis1=-2, axis2=-1), alpha)


def test_far_tokens_see_exactly_the_clamped_distance():
  grid0, grid = (4, 4), (8, 8)  # built for 4x4: per-axis squared distances clamp at 3^2
  var, alpha = random_var_alpha(grid)
  geometry = locat.GAugGeometry(grid0)
  s = np.asarray(locat.dense_bias(var, alpha, grid, geometry, 0))[0, 0, 0].reshape(grid)  # query (0, 0)
  v = var[0, 0, 0].astype(np.float64) + geometry.eps
  floor = alpha[0, 0, 0] * np.exp(-0.5 * 9 / v[0] - 0.5 * 9 / v[1])
  far = s[3:, 3:]  # at least 3 rows and 3 columns away
  np.testing.assert_array_equal(far, np.full_like(far, far[0, 0]))
  np.testing.assert_allclose(far[0, 0], floor, rtol=1e-5)
  assert s[2, 2] > far[0, 0] and s[7, 2] == s[3, 2] and s[2, 7] == s[2, 3]  # per axis, not jointly


# -- parameter counts (abstract models: nothing allocated) -----------------------------------------
# timm's vit_{tiny,small,base,large}_patch16_224 with 1000 classes.
TIMM_VIT_PARAMS = {'ti': 5_717_416, 's': 22_050_664, 'b': 86_567_656, 'l': 304_326_632}


@functools.cache
def count_params(name, **overrides):
  model = nnx.eval_shape(lambda: locatvit_jax.create_model(name, **overrides))
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize('name', vit.MODEL_NAMES)
def test_every_model_name_builds_with_the_expected_parameter_count(name):
  kind, size = name.removesuffix('16').split('_')
  depth = vit.SIZES[size][1]
  assert count_params(name) == TIMM_VIT_PARAMS[size] + (195 * depth if kind == 'locatvit' else 0)


# The names the authors register for LocAtViT (their models/vit.py) and timm's for plain ViT: size, LocAt.
AUTHORS_AND_TIMM_NAMES = {
    'locatvit_tiny': ('ti', True), 'locatvit_small': ('s', True), 'locatvit_base': ('b', True),
    'vit_tiny_patch16_224': ('ti', False), 'vit_small_patch16_224': ('s', False),
    'vit_base_patch16_224': ('b', False), 'vit_large_patch16_224': ('l', False),
    'nopos_vit_tiny_patch16_224': ('ti', False), 'nopos_vit_base_patch16_224': ('b', False),
}


def test_aliases_are_the_authors_and_timm_names():
  assert set(vit.MODEL_ALIASES) == set(AUTHORS_AND_TIMM_NAMES)
  assert set(vit.MODEL_ALIASES.values()) <= set(vit.MODEL_NAMES)


@pytest.mark.parametrize('name', sorted(AUTHORS_AND_TIMM_NAMES))
def test_authors_and_timm_names_build_the_models_they_name(name):
  size, locat = AUTHORS_AND_TIMM_NAMES[name]
  cfg = vit.model_config(name)
  # timm's ViT defaults, which the authors' LocAtViT keeps: 16 px patches at 224, class token, no registers;
  # their nopos_vit_* have no position embedding.
  pos_embed = 'none' if name.startswith('nopos_') else 'learn'
  assert (cfg.patch_size, cfg.img_size, cfg.pool, cfg.reg_tokens, cfg.pos_embed) == (16, (224, 224), 'token', 0,
                                                                                      pos_embed)
  assert (cfg.gaug, cfg.prr) == (locat, locat)
  ours = vit.model_config(f'{"locatvit" if locat else "vit"}_{size}16', pos_embed=pos_embed)
  assert cfg == ours  # whose parameters are counted above


@pytest.mark.parametrize('size', ['ti', 's', 'b'])
def test_gaug_adds_2340_parameters_and_prr_none(size):
  assert count_params(f'locatvit_{size}16', prr=False) - count_params(f'vit_{size}16') == 2340
  assert count_params(f'locatvit_{size}16') == count_params(f'locatvit_{size}16', prr=False)


@pytest.mark.parametrize('overrides, delta', [
    (dict(pool='gap'), -2 * 192),  # no class token, no position row for it
    (dict(pos_embed='none'), -197 * 192),
    (dict(reg_tokens=4), 2 * 4 * 192),  # the tokens and their position rows
    (dict(num_classes=0), -(192 * 1000 + 1000)),
])
def test_variant_parameter_counts(overrides, delta):
  # One block is enough: no variant touches the blocks.
  assert count_params('vit_ti16', depth=1, **overrides) == count_params('vit_ti16', depth=1) + delta


# -- forward passes ------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny():
  model = tiny_model()
  model.eval()
  return model


@pytest.mark.parametrize('size', [(224, 224), (160, 288), (96, 96)])
def test_shapes_at_several_resolutions(tiny, size):
  logits, feats = FORWARD(tiny, images(2, *size))
  assert logits.shape == (2, 7)
  assert feats.shape == (2, size[0] // 16, size[1] // 16, 64)
  assert np.isfinite(logits).all() and np.isfinite(feats).all()


def test_features_of_listed_layers(tiny):
  x = images(2, 64, 96)
  first, last = nnx.jit(lambda m, x: m.features(x, layers=[0, -1]))(tiny, x)
  np.testing.assert_array_equal(last, FORWARD(tiny, x)[1])
  # Block 0's output is what a one-block model with the same first block computes.
  params = loading.flatten(loading.get_params(tiny))
  one_block = loading.build_model(dataclasses.replace(tiny.cfg, depth=1),
                                  {k: v for k, v in params.items() if not k.startswith('blocks/1/')})
  np.testing.assert_allclose(first, FORWARD(one_block, x)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('overrides', [
    dict(gaug=False, prr=False),  # plain ViT
    dict(gaug=True, prr=False),
    dict(gaug=False, prr=True),
    dict(pool='gap'),  # no class token: the authors' GAP model below has one
], ids=['vit', 'gaug_only', 'prr_only', 'gap'])
def test_ablation_switches_run(overrides):
  model = tiny_model(**overrides)
  model.eval()
  logits, feats = FORWARD(model, images(2, 64, 96))
  assert logits.shape == (2, 7) and feats.shape == (2, 4, 6, 64)
  assert np.isfinite(logits).all() and np.isfinite(feats).all()


# The authors' variants (../shared/parity/README.md): folder -> the config load() must read, and the
# resolutions checked. Without a position embedding, another grid changes only GAug's variances, which
# the tiny model's parity test (test_loading.py) checks; with registers, it resamples the embedding
# around 5 prefix rows.
AUTHORS_VARIANTS = {
    'locatvit_nopos_random': (dict(pool='token', class_token=True, reg_tokens=0, pos_embed='none'), ('224',)),
    # timm's average pooling keeps the class token: it attends but is not pooled.
    'locatvit_reg_gap_random': (dict(pool='gap', class_token=True, reg_tokens=4, pos_embed='learn'),
                                ('224', 'dyn')),
}


def relative_error(got, ref):
  return np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize('name', sorted(AUTHORS_VARIANTS))
def test_variants_match_the_authors_outputs(name):
  folder = shared_fixture('parity', name)
  expected_cfg, resolutions = AUTHORS_VARIANTS[name]
  model = loading.load(folder)  # the class token, registers and pooling read from the tensors alone
  assert {k: getattr(model.cfg, k) for k in expected_cfg} == expected_cfg
  ref = np.load(folder / 'reference.npz')
  for res in resolutions:
    logits, feats = FORWARD(model, ref[f'images_{res}'])
    assert relative_error(logits, ref[f'logits_{res}']) < 1e-5, res
    assert relative_error(feats, ref[f'features_{res}']) < 1e-5, res


def test_patch_embedding_starts_as_pytorchs_conv_default():
  # timm's ViT init leaves the patch conv alone: PyTorch's default, weight and bias U(+-1/sqrt(fan_in)).
  params = locatvit_jax.create_model('vit_s16', depth=1, mlp_dim=8, num_classes=0, seed=3).patch_embed
  bound = (3 * 16 * 16) ** -0.5
  for p, tol in ((params.kernel[...], 0.01), (params.bias[...], 0.15)):  # 295k and 384 draws
    x = np.asarray(p).ravel()
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
    assert abs(x.std() / (bound / np.sqrt(3)) - 1) < tol
    assert abs(np.mean(np.abs(x) < bound / 2) - 0.5) < 2 * tol  # uniform: half the mass in the inner half


@pytest.mark.parametrize('variant, locat', [('reg', False), ('locat_reg', True)])
def test_reg_variants_have_four_registers_as_timms_reg4_models(variant, locat):
  config = common.classification_config('vit_ti16', variant)
  cfg = vit.model_config(config.model_name, **config.model.to_dict())
  assert (cfg.reg_tokens, cfg.num_prefix, cfg.pool, cfg.gaug, cfg.prr) == (4, 5, 'token', locat, locat)


@pytest.mark.parametrize('variant, locat', [('nopos', False), ('locat_nopos', True)])
def test_nopos_variants_keep_the_class_token_and_add_nothing(variant, locat):
  config = common.classification_config('vit_ti16', variant)
  model = locatvit_jax.create_model(config.model_name, num_classes=3, **{**config.model.to_dict(), **TINY})
  assert model.pos_embed is None and (model.cfg.num_prefix, model.cfg.gaug) == (1, locat)
  x, _ = model.embed(images(1, 32, 32))
  np.testing.assert_array_equal(x[0, 0], model.cls_token[...][0, 0])  # prepended, nothing added


@pytest.mark.parametrize('variant', ['gap', 'locat_gap'])
def test_gap_variants_keep_an_unpooled_class_token_as_the_authors_ran_them(variant):
  # The authors' GAP ablation is timm's --gp avg: the class token stays (it attends and has a position
  # row) but the head reads the mean of the patch tokens.
  config = common.classification_config('vit_ti16', variant)
  cfg = vit.model_config(config.model_name, **config.model.to_dict())
  assert (cfg.pool, cfg.class_token, cfg.num_prefix) == ('gap', True, 1)
  assert cfg.gaug == cfg.prr == (variant == 'locat_gap')
  no_token = vit.model_config(config.model_name, **{**config.model.to_dict(), 'class_token': False})
  assert no_token.num_prefix == 0  # still available as a switch


def test_prr_changes_logits_never_features(tiny):
  no_prr = rebuild(tiny, prr=False)
  x = images(2, 64, 96)
  logits, feats = FORWARD(tiny, x)
  logits_no_prr, feats_no_prr = FORWARD(no_prr, x)
  np.testing.assert_array_equal(feats, feats_no_prr)
  assert np.abs(logits - logits_no_prr).max() > 1e-3


@pytest.mark.parametrize('num_queries', [None, 1, 3])
def test_prr_matches_the_spec_formula_on_the_rows_asked_for(num_queries):
  """PRR (spec section 3) against float64 NumPy: softmax(x x^T / sqrt(C/H)) x per head; with
  num_queries, the first rows of that (what a class-token head reads), computed alone."""
  b, n, c, h = 2, 10, 12, 3
  x = np.random.default_rng(0).normal(size=(b, n, c))
  xh = x.reshape(b, n, h, c // h)
  logits = np.einsum('bqhd,bkhd->bhqk', xh, xh) / math.sqrt(c // h)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum('bhqk,bkhd->bqhd', p / p.sum(-1, keepdims=True), xh).reshape(b, n, c)[:, :num_queries]
  out = locat.prr(jnp.asarray(x, jnp.float32), h, num_queries=num_queries)
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(tiny):
  bf16 = rebuild(tiny, dtype='bfloat16')
  bf16.eval()
  assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype('float32')}
  x = images(2, 64, 96)
  (logits, feats), (logits16, feats16) = FORWARD(tiny, x), FORWARD(bf16, x)
  for ref, got in ((logits, logits16), (feats, feats16)):
    err = np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max()
    assert 0 < err < 3e-2  # nonzero: the matmuls did run in bf16


def test_drop_path_only_in_train_mode():
  model = tiny_model(drop_path=0.5)
  x = images(8, 32, 32)
  model.train()
  first, second = FORWARD(model, x)[0], FORWARD(model, x)[0]
  assert np.abs(first - second).max() > 1e-3
  model.eval()
  first, second = FORWARD(model, x)[0], FORWARD(model, x)[0]
  np.testing.assert_array_equal(first, second)
  no_drop = rebuild(model, drop_path=0.0)
  no_drop.eval()
  np.testing.assert_allclose(first, FORWARD(no_drop, x)[0], rtol=1e-6, atol=1e-6)


def test_remat_gives_the_same_outputs_and_gradients(tiny):
  x = images(2, 32, 48)

  @nnx.jit
  def loss_and_grads(model):
    return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)

  loss, grads = loss_and_grads(tiny)
  loss_remat, grads_remat = loss_and_grads(rebuild(tiny, remat='full'))
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  # Recomputation reorders float32 sums: ~1e-7 of each gradient's scale, for every attention path.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max()),
               grads_remat, grads)


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize('shape, message', [
    ((1, 100, 224, 3), 'image size 100x224 is not a positive multiple of the patch size 16'),
    ((1, 224, 40, 3), 'image size 224x40 is not a positive multiple of the patch size 16'),
    ((224, 224, 3), r'images of shape \(224, 224, 3\); expected \(batch, height, width, 3\)'),
    ((1, 32, 32, 1), r'images of shape \(1, 32, 32, 1\); expected \(batch, height, width, 3\)'),
])
def test_bad_images(tiny, shape, message):
  with pytest.raises(ValueError, match=message):
    tiny(jnp.zeros(shape))


def test_layers_out_of_range(tiny):
  with pytest.raises(ValueError, match=r'^layers \[0, 2, -3\]; expected block indices in -2..1 '
                     r'\(the model has 2 blocks\)$'):
    tiny.features(images(1, 32, 32), layers=[0, 2, -3])


def test_unknown_model_name_lists_every_accepted_name():
  with pytest.raises(ValueError, match=r"^unknown model name 'vit_xl16'; expected one of "
                     r"\('vit_ti16', .*'locatvit_l16'.*\) or \('locatvit_tiny', .*'vit_large_patch16_224'.*\)$"):
    locatvit_jax.create_model('vit_xl16')


@pytest.mark.parametrize('overrides, message', [
    (dict(width=100), 'width=100 must be a multiple of num_heads=3'),
    (dict(pool='max'), "pool='max'; expected 'token' or 'gap'"),
    (dict(class_token=False), "pool='token' needs class_token=True: it pools the class token"),
    (dict(pos_embed='sincos'), "pos_embed='sincos'; expected 'learn' or 'none'"),
    # float16 lacks the reference's fp16 distance cap.
    (dict(dtype='float16'), r"^dtype='float16'; expected one of \('float32', 'bfloat16'\)$"),
    (dict(gaug_impl='flash'), "gaug_impl='flash'; expected one of"),
    (dict(remat='all'), "remat='all'; expected one of"),
    (dict(img_size=(224, 200)), r'img_size=\(224, 200\) must be a multiple of patch_size=16'),
    (dict(drop_path=1.0), 'drop_path=1.0; expected 0 <= drop_path < 1'),
    (dict(reg_tokens=-1), 'reg_tokens'),
    (dict(dropout=0.1), r"unknown model config keys \['dropout'\]"),
])
def test_bad_config_values(overrides, message):
  with pytest.raises(ValueError, match=message):
    vit.model_config('locatvit_ti16', **overrides)


def test_gelu_is_the_exact_erf_gelu_and_the_patch_matmul_is_the_strided_conv():
  # The two XLA:CPU speed-ups of issue #17 compute the same functions as what they replaced.
  x = np.linspace(-10, 10, 4001, dtype=np.float32)
  want = np.array([0.5 * float(t) * (1 + math.erf(float(t) / math.sqrt(2))) for t in x])
  np.testing.assert_allclose(np.asarray(vit.gelu(jnp.asarray(x))), want, rtol=1e-6, atol=2e-6)
  conv = vit.PatchConv(8, 4, None, nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (2, 12, 8, 3))
  want = jax.lax.conv_general_dilated(images, conv.kernel[...], (4, 4), 'VALID', precision='highest',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + conv.bias[...]
  np.testing.assert_allclose(np.asarray(conv(images)), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(5, 6), (2, 3, 6), (2, 3, 4, 6)])
def test_linear_over_rows_is_nnx_linear(shape):
  # vit.Linear only flattens the leading dimensions (issue #17): same parameters, values and
  # gradients as nnx.Linear on inputs of any rank.
  ours = vit.Linear(6, 5, rngs=nnx.Rngs(0))
  ref = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  ours.bias[...] = ref.bias[...] = jax.random.normal(jax.random.key(2), (5,))
  np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])
  x = jax.random.normal(jax.random.key(1), shape)
  loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
  (got, got_dx), (want, want_dx) = (nnx.grad(loss, argnums=(0, 1))(m, x) for m in (ours, ref))
  assert ours(x).shape == shape[:-1] + (5,)
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-6)
  for name in ('kernel', 'bias'):
    np.testing.assert_allclose(getattr(got, name)[...], getattr(want, name)[...], rtol=1e-5, atol=1e-5)
