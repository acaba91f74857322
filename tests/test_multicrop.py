"""DINO's multi-crop pipeline (data/multicrop.py): shapes, the per-view chains, resumable streams."""

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from locatvit_jax.data import multicrop, sources


def crops_config(**kw):
  c = multicrop.default_crops_config()
  c.update(dict(global_size=32, local_size=16, num_local=3, **kw))
  return c


def test_a_batch_holds_two_static_shapes_normalised_with_imagenet_statistics(image_folder):
  loader = multicrop.multicrop_loader(sources.image_folder_source(str(image_folder / 'train')), global_batch_size=4,
                                      crops=crops_config(), seed=0, worker_count=0)
  batch = next(iter(loader))
  assert batch['global'].shape == (4, 2, 32, 32, 3) and batch['local'].shape == (4, 3, 16, 16, 3)
  assert batch['global'].dtype == batch['local'].dtype == np.float32
  lo = (0 - np.array(multicrop.IMAGENET_MEAN)) / np.array(multicrop.IMAGENET_STD)
  hi = (1 - np.array(multicrop.IMAGENET_MEAN)) / np.array(multicrop.IMAGENET_STD)
  for x in (batch['global'], batch['local']):
    assert np.all(x >= lo - 1e-5) and np.all(x <= hi + 1e-5)


def test_the_stream_resumes_where_it_was_saved(image_folder):
  make = lambda: iter(multicrop.multicrop_loader(sources.image_folder_source(str(image_folder / 'train')),
                                                 global_batch_size=4, crops=crops_config(), seed=3, worker_count=0))
  it = make()
  next(it)
  state = it.get_state()
  expected = next(it)
  resumed = make()
  resumed.set_state(state)
  got = next(resumed)
  np.testing.assert_array_equal(got['global'], expected['global'])
  np.testing.assert_array_equal(got['local'], expected['local'])


def view_of(image, seed, **chain):
  """One view with everything but `chain` switched off: the crop keeps the whole image."""
  c = crops_config(global_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                   mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  c.update({k: v for k, v in chain.items() if k in c})
  return multicrop.view(image, np.random.default_rng(seed), c, 32, c.global_scale,
                        blur=chain.get('blur', 0.0), solarize=chain.get('solarize', 0.0))


@pytest.fixture(scope='module')
def picture():
  rng = np.random.default_rng(0)
  return Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8))


def test_each_operation_of_the_view_chain(picture):
  as_float = lambda im: np.asarray(im, np.float32) / 255
  # Nothing on: the crop of the whole image at its own size, bicubic, is the image.
  np.testing.assert_allclose(view_of(picture, 0), as_float(picture), atol=1e-6)
  np.testing.assert_allclose(view_of(picture, 0, solarize=1.0), as_float(ImageOps.solarize(picture)), atol=1e-6)
  gray = view_of(picture, 0, grayscale_prob=1.0)
  np.testing.assert_allclose(gray, as_float(picture.convert('L').convert('RGB')), atol=1e-6)
  blurred = view_of(picture, 5, blur=1.0)
  # The radius is U(0.1, 2) from the view's generator: within 2 grey levels of one of PIL's blurs of that range.
  closest = min(np.abs(as_float(picture.filter(ImageFilter.GaussianBlur(radius=float(r)))) - blurred).max()
                for r in np.linspace(0.1, 2.0, 200))
  assert closest <= 2 / 255 + 1e-6 and np.abs(blurred - as_float(picture)).max() > 0.1
  flipped = view_of(picture, 0, hflip=1.0)
  np.testing.assert_allclose(flipped, as_float(picture)[:, ::-1], atol=1e-6)


def test_hue_shift_is_torchvisions_byte_rotation():
  image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (4, 5, 3), np.uint8))
  h, s, v = image.convert('HSV').split()
  # torchvision's PIL adjust_hue: np_h += np.uint8(hue_factor * 255) with uint8 wrapping; int(-25.5) = -25 -> 231.
  rotated = Image.fromarray(((np.asarray(h).astype(int) + 231) % 256).astype(np.uint8), 'L')
  want = np.asarray(Image.merge('HSV', (rotated, s, v)).convert('RGB'))
  np.testing.assert_array_equal(np.asarray(multicrop.adjust_hue(image, -0.1)), want)


@pytest.mark.parametrize('field, value, message', [
    ('local_size', 20, r'crops.local_size=20; expected a positive multiple of the patch size 16'),
    ('global_scale', (0.5, 0.2), r'crops.global_scale=\(0.5, 0.2\); expected \(min, max\)'),
    ('num_local', 0, 'crops.num_local=0; expected an integer >= 1'),
])
def test_bad_crops_are_one_clear_error(field, value, message):
  c = multicrop.default_crops_config()
  c[field] = value
  with pytest.raises(ValueError, match=message):
    multicrop.check_crops_config(c, 16)
