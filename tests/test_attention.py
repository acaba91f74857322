"""GAug attention paths: every implementation against `dense` (itself against NumPy in float64) in
values and gradients, their memory behaviour, the Triton lowering of the Pallas kernels, errors, and
the parity model under each implementation."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from locatvit_jax import loading
from locatvit_jax.models import attention, locat, vit

FAST_IMPLS = ('fused', 'blockwise', 'pallas_interpret')
# (grid, training grid, prefix tokens): square at the training grid; non-square and larger than the
# training grid (the distance clamp is active) with 5 prefix tokens; no prefix token, clamp active.
CASES = [((4, 4), (4, 4), 1), ((3, 5), (3, 3), 5), ((5, 4), (3, 3), 0)]
# 17 and 20 tokens in tiles of 8 rows: the last query and key tiles are padded.
BLOCKS = (8, 8)
# GPUs run float32 matmuls in TF32 by default, in XLA's dots and in Triton's; the tolerances here
# and the reference's 1e-5 are float32 ones. A no-op on CPU.
FULL_FLOAT32 = jax.default_matmul_precision('highest')


def random_inputs(grid, grid0, num_prefix, *, batch=2, heads=2, head_dim=8, seed=0):
  """q, k, v, var, alpha and a cotangent; var spans (0.2, var_max) so the kernel's width matters."""
  rng = np.random.default_rng(seed)
  geometry = locat.GAugGeometry(grid0)
  n, hw = num_prefix + grid[0] * grid[1], grid[0] * grid[1]
  q, k, v, do = (rng.normal(size=(batch, heads, n, head_dim)).astype(np.float32) for _ in range(4))
  var = rng.uniform(0.2, geometry.var_max, (batch, heads, hw, 2)).astype(np.float32)
  alpha = rng.uniform(0.0, 3.0, (batch, heads, hw)).astype(np.float32)
  return (q, k, v, var, alpha), do, geometry


def attention_vjp(impl, args, do, grid, geometry, num_prefix, blocks=None):
  """Output and gradients w.r.t. (q, k, v, var, alpha[, bias]), jitted; a sixth arg is the extra bias."""
  f = lambda *a: attention.gaug_attention(*a[:5], grid=grid, geometry=geometry, num_prefix=num_prefix,
                                          impl=impl, blocks=blocks, bias=a[5] if len(a) > 5 else None)

  @jax.jit
  def run(args, do):
    o, vjp = jax.vjp(f, *args)
    return o, vjp(do)
  return run(args, do)


def numpy_attention(q, k, v, var, alpha, grid, geometry, num_prefix, bias=None):
  """softmax(q k^T + S (+ bias)) v in float64 with S from the (N, N, 2) squared distances (spec
  section 2); var=None: no S."""
  h, w = grid
  pos = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing='ij'), -1).reshape(h * w, 2)
  dist = np.minimum((pos[:, None, :] - pos[None, :, :]) ** 2, geometry.dist_max)
  logits = np.einsum('bhqd,bhkd->bhqk', q.astype(np.float64), k)
  if var is not None:
    g = np.exp(-np.sum(0.5 * dist / (var.astype(np.float64)[..., :, None, :] + geometry.eps), axis=-1))
    logits[..., num_prefix:, num_prefix:] += alpha[..., None] * g
  if bias is not None:
    logits = logits + bias
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhqk,bhkd->bhqd', p / p.sum(-1, keepdims=True), v)


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


@pytest.mark.parametrize('grid, grid0, num_prefix', CASES)
def test_dense_matches_numpy(grid, grid0, num_prefix):
  args, do, geometry = random_inputs(grid, grid0, num_prefix)
  o, _ = attention_vjp('dense', args, do, grid, geometry, num_prefix)
  assert rel_err(o, numpy_attention(*args, grid, geometry, num_prefix)) < 1e-5


def skip_without_gpu():
  if jax.default_backend() != 'gpu':
    pytest.skip(f'compiled Pallas (Triton) needs a GPU backend, not {jax.default_backend()!r}; '
                'pallas_interpret runs the same kernels')


@pytest.mark.parametrize('impl', FAST_IMPLS + ('pallas',))
@pytest.mark.parametrize('grid, grid0, num_prefix', CASES)
def test_matches_dense_in_values_and_gradients(impl, grid, grid0, num_prefix):
  if impl == 'pallas':
    skip_without_gpu()
  args, do, geometry = random_inputs(grid, grid0, num_prefix)
  with FULL_FLOAT32:
    o_ref, grads_ref = attention_vjp('dense', args, do, grid, geometry, num_prefix)
    # Triton's tiles are powers of two >= 16: 17 to 21 tokens still pad a second tile.
    o, grads = attention_vjp(impl, args, do, grid, geometry, num_prefix,
                             blocks=(16, 16) if impl == 'pallas' else BLOCKS)
  assert rel_err(o, o_ref) < 1e-5
  for name, g, g_ref in zip(('q', 'k', 'v', 'var', 'alpha'), grads, grads_ref):
    assert rel_err(g, g_ref) < 2e-5, name


def test_blockwise_default_blocks():
  """blockwise's own tiles over 1 + 24 * 24 = 577 tokens: two query tiles of 289, one key tile."""
  args, do, geometry = random_inputs((24, 24), (14, 14), 1, batch=1, heads=1)
  o_ref, grads_ref = attention_vjp('dense', args, do, (24, 24), geometry, 1)
  o, grads = attention_vjp('blockwise', args, do, (24, 24), geometry, 1)
  assert rel_err(o, o_ref) < 1e-5
  for g, g_ref in zip(grads, grads_ref):
    assert rel_err(g, g_ref) < 2e-5


@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_bfloat16_inputs(impl):
  grid, grid0, num_prefix = CASES[1]
  args, do, geometry = random_inputs(grid, grid0, num_prefix)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  args16 = tuple(map(bf16, args[:3])) + args[3:]
  o_ref, grads_ref = attention_vjp('dense', args16, bf16(do), grid, geometry, num_prefix)
  o, grads = attention_vjp(impl, args16, bf16(do), grid, geometry, num_prefix, blocks=BLOCKS)
  assert o.dtype == jnp.bfloat16
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32] * 2
  assert rel_err(o, o_ref) < 2e-2
  for g, g_ref in zip(grads, grads_ref):
    assert rel_err(g, g_ref) < 5e-2


@pytest.mark.parametrize('impl, expected',
                         [('dense', 2), ('fused', 1), ('blockwise', 0), ('pallas_interpret', 0)])
def test_residuals_of_size_n_squared(impl, expected, capsys):
  """What the backward keeps: the softmax and its normaliser (dense), one exp (fused), nothing (tiled)."""
  grid, grid0, num_prefix = CASES[0]
  args, _, geometry = random_inputs(grid, grid0, num_prefix)
  n = args[0].shape[2]
  print_saved_residuals(lambda *a: attention.gaug_attention(
      *a, grid=grid, geometry=geometry, num_prefix=num_prefix, impl=impl, blocks=BLOCKS), *args)
  shapes = re.findall(r'^\w+\[([\d,]*)\]', capsys.readouterr().out, re.M)
  assert sum(s.endswith(f'{n},{n}') for s in shapes) == expected


def test_blockwise_memory_grows_linearly():
  """XLA's temporaries of forward + backward from 1025 to 4097 tokens (4x): about 16x for fused,
  about 4x for blockwise."""

  def temp_bytes(impl, side):
    args, do, geometry = random_inputs((side, side), (14, 14), 1, batch=1, heads=1)
    f = lambda *a: attention.gaug_attention(*a, grid=(side, side), geometry=geometry, num_prefix=1,
                                            impl=impl, blocks=(128, 128))
    fwd_bwd = lambda args, do: jax.vjp(f, *args)[1](do)
    return jax.jit(fwd_bwd).lower(args, do).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes('fused', 64) / temp_bytes('fused', 32) > 12
  assert temp_bytes('blockwise', 64) / temp_bytes('blockwise', 32) < 5


def test_pallas_kernels_lower_to_triton():
  """Forward and both backward kernels pass Pallas' Triton lowering (no GPU needed to lower)."""
  grid, grid0, num_prefix = CASES[1]
  args, do, geometry = random_inputs(grid, grid0, num_prefix, head_dim=64)
  f = lambda *a: attention.gaug_attention(*a, grid=grid, geometry=geometry, num_prefix=num_prefix,
                                          impl='pallas', blocks=(16, 16))
  fwd_bwd = lambda args, do: jax.vjp(f, *args)[1](do)
  text = jax.jit(fwd_bwd).trace(args, do).lower(lowering_platforms=('cuda',)).as_text()
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 3


@pytest.mark.parametrize('spec', [('data', 'tensor'), ('data',)])
def test_pallas_kernels_split_over_batch_and_heads_on_a_mesh(spec):
  """On 8 devices the kernels run per device on their batch and head blocks: the same values and
  gradients as `dense`, and no gathers. (Without their partitioning rule the compiled step had 155.)
  Heads 3 with ('data',): only the batch is split."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  grid, grid0, num_prefix = CASES[0]
  args, do, geometry = random_inputs(grid, grid0, num_prefix, batch=8, heads=4 if 'tensor' in spec else 3)
  # The suite's 8 CPU devices, also where the default backend is a single GPU.
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'), axis_types=(AxisType.Auto,) * 2, devices=jax.devices('cpu'))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  f = lambda *a: attention.gaug_attention(*a, grid=grid, geometry=geometry, num_prefix=num_prefix,
                                          impl='pallas_interpret', blocks=(16, 16))
  fwd_bwd = jax.jit(lambda args, do: (lambda o, vjp: (o, vjp(do)))(*jax.vjp(f, *args)))
  sharded_args, sharded_do = [put(x) for x in args], put(do)
  o, grads = fwd_bwd(sharded_args, sharded_do)
  o_ref, grads_ref = attention_vjp('dense', args, do, grid, geometry, num_prefix)
  assert o.sharding.spec[:len(spec)] == spec
  for x, x_ref in zip((o, *grads), (o_ref, *grads_ref)):
    assert rel_err(x, x_ref) < 2e-5
  hlo = fwd_bwd.lower(sharded_args, sharded_do).compile().as_text()
  assert not re.search(r'all-gather|all-to-all|collective-permute', hlo)


def test_model_with_pallas_on_a_mesh_matches_one_device():
  """A tiny LocAtViT's gradients with the batch over data x fsdp and the parameters over fsdp and
  tensor (so the kernels see heads split over tensor), under the Pallas kernels, against `fused`
  on one device."""
  import locatvit_jax
  from locatvit_jax import sharding
  model = locatvit_jax.create_model('locatvit_ti16', num_classes=4, img_size=32, width=32, depth=2,
                                    num_heads=2, gaug_impl='fused')
  model.eval()  # no drop path: no random state to thread through the jitted gradient
  images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def grads(params, images, impl):
    def loss(p):
      m = nnx.merge(graphdef, p, rest)
      m.set_attributes(gaug_impl=impl)
      return jnp.sum(m(images) ** 2)
    return jax.grad(loss)(params)

  with FULL_FLOAT32:
    ref = jax.jit(functools.partial(grads, impl='fused'))(params, images)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices('cpu'))
    sharded = jax.jit(functools.partial(grads, impl='pallas_interpret'),
                      in_shardings=(sharding.tree_shardings(params, mesh), sharding.batch_sharding(mesh)))
    got = sharded(params, images)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), got, ref)


@pytest.mark.parametrize('kwargs, message', [
    (dict(impl='flash'), "gaug_impl='flash'; expected one of"),
    (dict(impl='blockwise', blocks=(8, 0)), r'blocks=\(8, 0\); expected two positive tile sizes'),
    (dict(impl='pallas', blocks=(24, 32)), r'blocks=\(24, 32\); the Triton kernels need powers of two >= 16'),
    (dict(impl='dense', num_prefix=2), r'17 tokens and var of shape \(2, 2, 16, 2\); expected 2 prefix'),
])
def test_errors(kwargs, message):
  args, _, geometry = random_inputs((4, 4), (4, 4), 1)
  kwargs = dict(dict(grid=(4, 4), geometry=geometry, num_prefix=1), **kwargs)
  with pytest.raises(ValueError, match=message):
    attention.gaug_attention(*args, **kwargs)


# -- the authors' model ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def parity(parity_dir):
  model = loading.load(str(parity_dir))
  return model, np.load(parity_dir / 'reference.npz')


@pytest.mark.parametrize('impl', attention.GAUG_IMPLS)
def test_parity_model_under_each_impl(impl, parity):
  if impl == 'pallas':
    skip_without_gpu()
  model, ref = parity
  vit.model_config('locatvit_ti16', gaug_impl=impl)  # a valid config value
  model.set_attributes(gaug_impl=impl)
  with FULL_FLOAT32:
    logits = nnx.jit(lambda m, x: m(x))(model, ref['images_224'])
  assert rel_err(logits, ref['logits_224']) < 1e-5


# -- an extra additive bias (Swin's relative position bias + shifted-window mask) ------------------
# Broadcast forms: one per head shared by the batch (Swin's relative position bias), one per example
# shared by the heads, and a full one.
BIAS_SHAPES = [(1, 2), (2, 1), (2, 2)]


def random_bias(n, shape, *, seed=1):
  """A smooth part plus a -100 mask over a checkerboard of token groups, as Swin's shift mask."""
  rng = np.random.default_rng(seed)
  groups = rng.integers(0, 3, n)
  mask = np.where(groups[:, None] == groups[None, :], 0.0, -100.0)
  return (rng.normal(size=shape + (n, n)) + mask).astype(np.float32)


@pytest.mark.parametrize('bias_shape', BIAS_SHAPES)
@pytest.mark.parametrize('grid, grid0, num_prefix', CASES[:2])
def test_dense_with_bias_matches_numpy(grid, grid0, num_prefix, bias_shape):
  args, do, geometry = random_inputs(grid, grid0, num_prefix)
  bias = random_bias(args[0].shape[2], bias_shape)
  o, _ = attention_vjp('dense', args + (bias,), do, grid, geometry, num_prefix)
  assert rel_err(o, numpy_attention(*args, grid, geometry, num_prefix, bias=bias)) < 1e-5


@pytest.mark.parametrize('bias_shape', BIAS_SHAPES)
def test_plain_attention_with_bias(bias_shape):
  (q, k, v, _, _), do, geometry = random_inputs((3, 5), (3, 3), 1)
  bias = random_bias(q.shape[2], bias_shape)
  o = attention.plain_attention(q, k, v, bias)
  assert rel_err(o, numpy_attention(q, k, v, None, None, (3, 5), geometry, 1, bias=bias)) < 1e-5
  # the bias' gradient against the materialised softmax's, by hand: dz = p * (dp - sum_j p dp)
  dbias = jax.grad(lambda b: jnp.sum(attention.plain_attention(q, k, v, b) * do))(bias)
  p = np.asarray(attention.probabilities(q, k, jnp.asarray(bias)), np.float64)
  dp = np.einsum('bhqd,bhkd->bhqk', do, v)
  dz = p * (dp - np.sum(p * dp, -1, keepdims=True))
  assert dbias.shape == bias.shape
  assert rel_err(dbias, np.sum(dz, axis=tuple(i for i in (0, 1) if bias_shape[i] == 1), keepdims=True)) < 1e-5


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
@pytest.mark.parametrize('bias_shape', [None] + list(BIAS_SHAPES))
def test_plain_attention_matches_softmax_autodiff(bias_shape, dtype, tol, capsys):
  """plain_attention (the fused core without S) against autodiff of the materialised softmax, in
  values and every gradient; its backward keeps one (N, N) array where autodiff keeps two."""
  (q, k, v, _, _), do, _ = random_inputs((3, 5), (3, 3), 1)
  q, k, v, do = (jnp.asarray(x, dtype) for x in (q, k, v, do))
  args = (q, k, v) if bias_shape is None else (q, k, v, random_bias(q.shape[2], bias_shape))
  reference = lambda q, k, v, *bias: attention.attend(attention.probabilities(q, k, *bias), v)
  with FULL_FLOAT32:
    o_ref, vjp_ref = jax.vjp(reference, *args)
    o, vjp = jax.vjp(attention.plain_attention, *args)
  assert o.dtype == dtype and rel_err(o, o_ref) < tol / 2
  for name, g, g_ref in zip('qkvb', vjp(do), vjp_ref(do)):
    assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
    assert rel_err(g, g_ref) < tol, name
  n = q.shape[2]
  for f, expected in ((reference, 2), (attention.plain_attention, 1)):
    print_saved_residuals(f, *args)
    shapes = re.findall(r'^\w+\[([\d,]*)\]', capsys.readouterr().out, re.M)
    assert sum(s.endswith(f'{n},{n}') for s in shapes) == expected, f


@pytest.mark.parametrize('impl', ('fused', 'blockwise'))
@pytest.mark.parametrize('bias_shape', BIAS_SHAPES)
@pytest.mark.parametrize('grid, grid0, num_prefix', CASES)
def test_bias_matches_dense_in_values_and_gradients(impl, grid, grid0, num_prefix, bias_shape):
  args, do, geometry = random_inputs(grid, grid0, num_prefix)
  args = args + (random_bias(args[0].shape[2], bias_shape),)
  with FULL_FLOAT32:
    o_ref, grads_ref = attention_vjp('dense', args, do, grid, geometry, num_prefix)
    o, grads = attention_vjp(impl, args, do, grid, geometry, num_prefix, blocks=BLOCKS)
  assert rel_err(o, o_ref) < 1e-5
  assert grads[5].shape == args[5].shape
  for name, g, g_ref in zip(('q', 'k', 'v', 'var', 'alpha', 'bias'), grads, grads_ref):
    assert rel_err(g, g_ref) < 2e-5, name


@pytest.mark.parametrize('impl', ('fused', 'blockwise'))
def test_bound_follows_the_bias(impl):
  """Masked keys carry the rows' largest logits (+200) under a -1000 mask: a bound taken before the
  bias would underflow every unmasked term (exp(-200)) and divide 0 by 0."""
  grid, grid0, num_prefix = CASES[1]
  (q, k, v, var, alpha), do, geometry = random_inputs(grid, grid0, num_prefix)
  n = q.shape[2]
  masked = np.arange(n) % 2 == 0
  q = np.ones_like(q) / np.sqrt(q.shape[-1])
  k = np.where(masked[:, None], 200.0 / np.sqrt(k.shape[-1]), k)
  bias = np.where(masked[None, None, None, :], -1000.0, 0.0).astype(np.float32) * np.ones((1, 1, n, 1), np.float32)
  args = (q.astype(np.float32), k.astype(np.float32), v, var, alpha, bias)
  o_ref, grads_ref = attention_vjp('dense', args, do, grid, geometry, num_prefix)
  o, grads = attention_vjp(impl, args, do, grid, geometry, num_prefix, blocks=BLOCKS)
  assert np.all(np.isfinite(o)) and rel_err(o, o_ref) < 1e-5
  for g, g_ref in zip(grads[:5], grads_ref[:5]):
    assert rel_err(g, g_ref) < 2e-5


@pytest.mark.parametrize('impl', ('pallas', 'pallas_interpret'))
def test_pallas_rejects_a_bias(impl):
  args, _, geometry = random_inputs((4, 4), (4, 4), 1)
  with pytest.raises(ValueError, match=f"gaug_impl='{impl}' takes no extra logits bias"):
    attention.gaug_attention(*args, grid=(4, 4), geometry=geometry, num_prefix=1, impl=impl,
                             bias=random_bias(17, (1, 2)))


@pytest.mark.parametrize('shape', [(2, 3, 17, 17), (1, 2, 17, 16), (2, 17, 17)])
def test_bias_of_a_wrong_shape(shape):
  args, _, geometry = random_inputs((4, 4), (4, 4), 1)
  message = re.escape(f'bias of shape {shape}; expected (2 or 1, 2 or 1, 17, 17)')
  with pytest.raises(ValueError, match=message):
    attention.gaug_attention(*args, grid=(4, 4), geometry=geometry, num_prefix=1, impl='fused',
                             bias=np.zeros(shape, np.float32))
  with pytest.raises(ValueError, match=message):
    attention.plain_attention(*args[:3], np.zeros(shape, np.float32))
