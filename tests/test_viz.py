"""Pictures: palettes, panels, GAug kernels and attention maps (against the model), bar charts."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import locatvit_jax
from locatvit_jax import viz

TINY = dict(img_size=32, width=32, depth=2, num_heads=2, mlp_dim=64)


@pytest.fixture(scope='module')
def model():
  return locatvit_jax.create_model('locatvit_ti16', num_classes=10, **TINY)


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


def _block_input(model, image, block):
  """Tokens entering `block`, from the model's own encoder (evaluation mode)."""
  view = nnx.view(model, deterministic=True)
  x = jnp.asarray(image)[None]
  if block == 0:
    return view.embed(x)[0]
  return view.encode(x, layers=(block - 1,))[2][0]


@pytest.mark.parametrize('block', [0, 1])
def test_internals_reproduce_the_models_attention(model, image, block):
  grid, found = viz.attention_internals(model, image, [block])
  found = found[block]
  assert grid == (2, 2) and found['probs'].shape == (2, 5, 5)
  np.testing.assert_allclose(found['probs'].sum(-1), 1.0, rtol=1e-5)
  # The GAug bias from var and alpha, written out independently (spec section 2).
  var, alpha, eps = found['var'], found['alpha'], model.blocks[block].attn.geometry.eps
  rows, cols = np.divmod(np.arange(4), 2)
  d_row = (rows[:, None] - rows[None, :]) ** 2
  d_col = (cols[:, None] - cols[None, :]) ** 2
  expected = alpha[..., None] * np.exp(-0.5 * (d_row / (var[..., 0:1] + eps) + d_col / (var[..., 1:2] + eps)))
  np.testing.assert_allclose(found['bias'], expected, rtol=1e-5, atol=1e-7)
  # Attending with these probabilities gives the model's attention output.
  blk = model.blocks[block]
  x = blk.norm1(_block_input(model, image, block))
  v = blk.attn.qkv(x).reshape(1, 5, 3, 2, 16)[:, :, 2].transpose(0, 2, 1, 3)
  mixed = jnp.einsum('hqk,bhkd->bqhd', found['probs'], v).reshape(1, 5, 32)
  np.testing.assert_allclose(blk.attn.proj(mixed), blk.attn(x, grid, 1), rtol=1e-4, atol=1e-5)


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


def test_query_pictures_reject_bad_requests(tmp_path, model, image):
  path = str(tmp_path / 'q.png')
  with pytest.raises(ValueError, match=r'layers \[2\]; expected block indices in -2..1'):
    viz.save_attention_maps(path, model, image, [2], [(0, 0)])
  with pytest.raises(ValueError, match=r'query_patches \[\(2, 0\)\]; expected \(row, col\) pairs on the 2x2'):
    viz.save_gaug_kernels(path, model, image, [0], [(2, 0)])
  plain = locatvit_jax.create_model('vit_ti16', num_classes=10, **TINY)
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
