"""Pictures: palettes, panels, GAug kernels and attention maps (against the model), bar charts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import locatvit_jax
from locatvit_jax import viz

TINY = dict(img_size=32, width=32, depth=2, num_heads=2, mlp_dim=64)


def loud_model(name):
  """A tiny model with every parameter drawn large, so that logits, GAug widths and strengths all
  matter (at the initialisation's scale, attention is almost uniform)."""
  model = locatvit_jax.create_model(name, num_classes=10, **TINY)
  rng = np.random.default_rng(1)
  nnx.update(model, jax.tree.map(lambda p: rng.normal(0, 0.3, p.shape).astype(np.float32),
                                 nnx.state(model, nnx.Param)))
  return model


@pytest.fixture(scope='module')
def model():
  return loud_model('locatvit_ti16')


@pytest.fixture(scope='module')
def plain():
  return loud_model('vit_ti16')


@pytest.fixture(scope='module')
def image():
  return np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)


def _png(path) -> np.ndarray:
  with Image.open(path) as im:
    assert im.format == 'PNG'
    return np.asarray(im.convert('RGB'))


def test_palette_is_fixed_distinct_and_ignore_is_black():
  palette = viz.seg_palette(150)
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  np.testing.assert_array_equal(palette, viz.seg_palette(150))
  np.testing.assert_array_equal(palette[255], [0, 0, 0])
  assert len({tuple(c) for c in palette[:150]}) == 150
  np.testing.assert_array_equal(viz.seg_palette(11)[:11], palette[:11])  # colours do not depend on the count
  with pytest.raises(ValueError, match='num_classes=0; expected 1..254'):
    viz.seg_palette(0)


def test_segmentation_panels_show_image_truth_and_prediction(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
  labels = [rng.integers(0, 5, (32, 32)).astype(np.uint8) for _ in range(2)]
  labels[0][:4] = 255
  preds = [rng.integers(0, 5, (32, 32)) for _ in range(2)]
  palette = viz.seg_palette(5)
  picture = _png(viz.save_segmentation_panels(str(tmp_path / 'seg.png'), images, labels, preds, palette))
  cell, pad = 160, viz.PAD  # 32 px enlarged x5
  assert picture.shape[1] == pad + 3 * (cell + pad)
  assert picture.shape[0] > 2 * (cell + pad)
  # Row 0: the enlarged image, then the ground truth and the prediction in palette colours.
  np.testing.assert_array_equal(picture[pad:pad + cell:5, pad:pad + cell:5], images[0])
  np.testing.assert_array_equal(picture[pad:pad + cell:5, 2 * pad + cell:2 * pad + 2 * cell:5], palette[labels[0]])
  np.testing.assert_array_equal(picture[pad:pad + cell:5, 3 * pad + 2 * cell:3 * pad + 3 * cell:5], palette[preds[0]])
  np.testing.assert_array_equal(picture[pad, 2 * pad + cell], [0, 0, 0])  # ignored pixel
  with pytest.raises(ValueError, match=r'example 1: image \(32, 32\), label \(16, 16\)'):
    viz.save_segmentation_panels(str(tmp_path / 'bad.png'), images, [labels[0], labels[1][:16, :16]], preds, palette)


def test_image_grid_has_one_slot_per_image(tmp_path):
  images = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(5)]
  picture = _png(viz.save_image_grid(str(tmp_path / 'grid.png'), images, labels=range(5), cols=3))
  assert picture.shape[1] == viz.PAD + 3 * (160 + viz.PAD)
  np.testing.assert_array_equal(picture[viz.PAD + 80, 2 * viz.PAD + 160 + 80], [40, 40, 40])  # image 1


def numpy_internals(model, x, block, grid):
  """var, alpha, S and softmax(q k^T / sqrt(d) + S) of one block in float64 (spec section 2), from the
  block's input tokens x (N, C) and its parameters, at the grid the model was built for."""
  w = lambda p: np.asarray(p[...], np.float64)
  blk, p, h = model.blocks[block], model.cfg.num_prefix, model.cfg.num_heads
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * w(blk.norm1.scale)
  y += w(blk.norm1.bias)
  n, c = y.shape
  q, k, _ = (y @ w(blk.attn.qkv.kernel) + w(blk.attn.qkv.bias)).reshape(n, 3, h, c // h).transpose(1, 2, 0, 3)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(c // h)
  out = {}
  if model.cfg.gaug:
    gaug, c_max = blk.attn.gaug, max(grid) ** 2
    var = c_max / (1 + np.exp(np.log(c_max - 1) - q[:, p:] @ w(gaug.var_proj.kernel) - w(gaug.var_proj.bias)))
    alpha = np.log1p(np.exp(q[:, p:] @ w(gaug.alpha_proj.kernel) + w(gaug.alpha_proj.bias)))[..., 0]
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    d_row, d_col = (rows[:, None] - rows[None, :]) ** 2, (cols[:, None] - cols[None, :]) ** 2
    eps = 0.1  # the spec's eps for this grid
    bias = alpha[..., None] * np.exp(-0.5 * (d_row / (var[..., 0:1] + eps) + d_col / (var[..., 1:2] + eps)))
    logits[:, p:, p:] += bias
    out.update(var=var, alpha=alpha, bias=bias)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return dict(out, probs=e / e.sum(-1, keepdims=True))


@pytest.mark.parametrize('name', ['model', 'plain'])
def test_internals_are_the_attention_of_the_spec(request, name, image):
  """What the attention layers expose, against NumPy."""
  model = request.getfixturevalue(name)
  grid, found = viz.attention_internals(model, image, [0, 1])
  assert grid == (2, 2) and sorted(found) == [0, 1]
  view = nnx.view(model, deterministic=True)
  tokens, _ = view.embed(jnp.asarray(image)[None])
  for block in (0, 1):
    want = numpy_internals(model, np.asarray(tokens[0], np.float64), block, grid)
    assert sorted(found[block]) == sorted(want)
    for key, value in want.items():
      np.testing.assert_allclose(found[block][key], value, rtol=1e-5, atol=1e-7, err_msg=f'block {block} {key}')
    np.testing.assert_allclose(found[block]['probs'].sum(-1), 1.0, rtol=1e-6)
    tokens = view.blocks[block](tokens, grid, model.cfg.num_prefix)


def test_internals_leave_the_model_in_training_mode(model, image):
  viz.attention_internals(model, image, [0])
  assert model.blocks[1].drop_path1.deterministic is False


@pytest.mark.parametrize('save', [viz.save_gaug_kernels, viz.save_attention_maps])
@pytest.mark.parametrize('per_head', [False, True])
def test_query_pictures(tmp_path, model, image, save, per_head):
  queries = [(0, 0), (1, 1), (0, 1)]
  picture = _png(save(str(tmp_path / 'q.png'), model, image, [0, -1], queries, per_head=per_head))
  cols = len(queries) * (2 if per_head else 1)
  assert picture.shape[1] >= viz.PAD + cols * (160 + viz.PAD)
  assert picture.shape[0] >= 2 * (160 + viz.PAD)
  # The first query, patch (0, 0), is outlined at the top-left of the first cell.
  outlined = np.all(picture == viz.QUERY_OUTLINE, axis=-1)
  assert outlined.sum() > 0
  ys, xs = np.nonzero(outlined[:, :viz.PAD + 160])
  assert xs.min() == viz.PAD and xs[ys == ys.min()].max() == viz.PAD + 79  # one 16 px patch x5


def test_query_pictures_reject_bad_requests(tmp_path, model, plain, image):
  path = str(tmp_path / 'q.png')
  with pytest.raises(ValueError, match=r'layers \[2\];'):  # the message: test_model.py
    viz.save_attention_maps(path, model, image, [2], [(0, 0)])
  with pytest.raises(ValueError, match=r'query_patches \[\(2, 0\)\]; expected \(row, col\) pairs on the 2x2'):
    viz.save_gaug_kernels(path, model, image, [0], [(2, 0)])
  with pytest.raises(ValueError, match='the model has no GAug'):
    viz.save_gaug_kernels(path, plain, image, [0], [(0, 0)])
  viz.save_attention_maps(path, plain, image, [0], [(0, 0)])  # plain attention has maps


def test_bar_chart(tmp_path):
  groups = {'vit': {'top1': [71.2, 71.9, 70.8], 'miou': [40.1, 40.5]},
            'locatvit': {'top1': [73.0, 73.4], 'miou': [44.2]}}
  picture = _png(viz.save_bar_chart(str(tmp_path / 'bars.png'), groups, title='compare'))
  assert picture.shape[0] > 300 and picture.shape[1] > 2 * 200
  palette = viz.seg_palette(2)
  for colour in palette[:2]:  # one coloured bar per variant
    assert np.all(picture == colour, axis=-1).sum() > 1000
  with pytest.raises(ValueError, match=r"variant 'vit' has no values for \['miou'\]"):
    viz.save_bar_chart(str(tmp_path / 'bad.png'), {'vit': {'top1': [1.0], 'miou': []}})
