"""Hummingbird: label transfer, sampling, matching and the whole evaluator against NumPy
written here from the protocol; sharded (8 devices) == one device; config errors."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from flax import nnx

from locatvit_jax import sharding
from locatvit_jax.evaluators import hummingbird as hb
from locatvit_jax.evaluators import make_evaluator, retrieval
from locatvit_jax.models import vit

K, TEMP = 7, 0.02


def mesh_of(devices, **axes):
  return sharding.make_mesh(ml_collections.ConfigDict(axes or dict(data=-1)), devices)


def unit_rows(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_transfer(queries, memory, labels, k=K, temperature=TEMP):
  """Brute force: the k most similar rows, softmax(similarity / T) over them, weighted label average."""
  sims = unit_rows(queries) @ unit_rows(memory).T
  ids = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  top = np.take_along_axis(sims, ids, 1)
  w = np.exp((top - top[:, :1]) / temperature)
  w /= w.sum(1, keepdims=True)
  return np.einsum('qk,qkl->ql', w, labels[ids]), top, ids


@pytest.fixture(scope='module')
def random_memory():
  rng = np.random.default_rng(0)
  return (unit_rows(rng.standard_normal((203, 16))).astype(np.float32), rng.random((203, 5)).astype(np.float32),
          unit_rows(rng.standard_normal((37, 16))).astype(np.float32))


@pytest.mark.parametrize('axes', [dict(data=8), dict(data=1)])
def test_label_transfer_equals_numpy(random_memory, axes):
  memory, labels, queries = random_memory
  mesh = mesh_of(jax.devices()[:axes['data']], **axes)
  # (retrieval.search itself is tested in test_retrieval.py.)
  bank = retrieval.make_memory_bank(memory, labels, mesh, memory_chunk=8, k=K)
  want, _, _ = numpy_transfer(queries, memory, labels)
  # Query blocks of 16: three calls, the last padded.
  np.testing.assert_allclose(hb.transfer_labels(queries, bank, k=K, temperature=TEMP, mesh=mesh, query_block=16),
                             want, atol=1e-5)
  # approx_max_k is exact on CPU: this runs the approx path end to end (its recall: test_retrieval.py).
  np.testing.assert_allclose(hb.transfer_labels(queries, bank, k=K, temperature=TEMP, mesh=mesh, query_block=16,
                                                approx_recall=0.95), want, atol=1e-5)


def test_patch_distributions_and_the_references_sampling():
  rng = np.random.default_rng(1)
  mask = rng.choice([0, 1, 2, 255], size=(8, 8), p=[0.4, 0.3, 0.2, 0.1]).astype(np.uint8)
  mask[4:, 4:] = 255  # one patch with no labelled pixel
  for ignore_as in (None, 0, 3):
    got = hb.patch_label_distributions(mask, 4, 4, ignore_as)
    for p, (r, c) in enumerate(itertools.product(range(2), range(2))):
      pixels = mask[4 * r:4 * r + 4, 4 * c:4 * c + 4].ravel().astype(int)
      if ignore_as is not None:
        pixels[pixels == 255] = ignore_as
      pixels = pixels[pixels != 255]
      want = np.array([np.sum(pixels == k) for k in range(4)]) / max(len(pixels), 1)
      np.testing.assert_allclose(got[p], want, err_msg=f'patch {p}, ignore_as {ignore_as}')
  # Sampling: score = sum over present classes of their patch counts, times U(0, 1), smallest first.
  dist = np.array([[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]], np.float32)
  noise = np.random.default_rng(5).random(4)
  scores = np.array([3 * noise[0], (3 + 1) * noise[1], 1 * noise[2], 3 * noise[3], 1e6])
  np.testing.assert_array_equal(hb.sample_patches(dist, 3, np.random.default_rng(5)), np.argsort(scores)[:3])


def test_hungarian_matching_and_the_references_mean():
  rng = np.random.default_rng(2)
  label = rng.integers(0, 4, size=500)
  perm = np.array([2, 0, 3, 1])
  pred = np.where(rng.random(500) < 0.8, perm[label], rng.integers(0, 4, size=500))
  conf = np.zeros((4, 4))
  np.add.at(conf, (label, pred), 1)

  def miou(c):
    iou = np.diag(c) / (c.sum(0) + c.sum(1) - np.diag(c))
    return iou.mean()

  # Brute force over every relabelling of the predictions: the best summed IoU.
  def summed_iou(relabel):
    c = conf[:, np.argsort(relabel)]
    return sum(np.diag(c) / (c.sum(1) + c.sum(0) - np.diag(c)))

  best = max(itertools.permutations(range(4)), key=summed_iou)
  matched = hb.hungarian_match(conf)
  np.testing.assert_array_equal(matched, conf[:, np.argsort(best)])
  assert miou(matched) > 0.6 > miou(conf)
  # The reference averages over every class, an empty one counting 0; segmentation_metrics leaves it out.
  with_empty = np.pad(matched, ((0, 1), (0, 1)))
  assert hb.reference_scores(with_empty)['miou'] == pytest.approx(miou(matched) * 4 / 5)
  np.testing.assert_allclose(hb.reference_scores(with_empty)['per_class_iou'][:4],
                             np.diag(matched) / (matched.sum(0) + matched.sum(1) - np.diag(matched)))


# -- the whole evaluator -----------------------------------------------------------------------------
def write_voc(root, train=6, val=3, size=(40, 48)):
  """VOCdevkit/VOC2012 with blocky images whose colour encodes the class, 255 on some borders."""
  base = root / 'VOCdevkit' / 'VOC2012'
  for d in ('JPEGImages', 'SegmentationClass', 'SegmentationClassAug', 'ImageSets/Segmentation'):
    (base / d).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(3)
  colours = rng.integers(0, 256, size=(21, 3))
  names = {'aug': [f'2008_{i:06d}' for i in range(train)], 'val': [f'2007_{i:06d}' for i in range(val)]}
  for split, ids in names.items():
    for name in ids:
      grid = rng.choice([0, 3, 7, 20], size=(size[0] // 8, size[1] // 8))
      mask = np.kron(grid, np.ones((8, 8), int)).astype(np.uint8)
      image = colours[mask] + rng.integers(-10, 10, size=mask.shape + (3,))
      mask[::8] = 255
      Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(base / 'JPEGImages' / f'{name}.jpg')
      folder = 'SegmentationClassAug' if split == 'aug' else 'SegmentationClass'
      Image.fromarray(mask).save(base / folder / f'{name}.png')
    (base / 'ImageSets/Segmentation' / f'{split}.txt').write_text('\n'.join(ids) + '\n')
  return root


@pytest.fixture(scope='module')
def voc_root(tmp_path_factory):
  return write_voc(tmp_path_factory.mktemp('voc'))


@pytest.fixture(scope='module')
def tiny_model():
  cfg = vit.ViTConfig(num_classes=0, img_size=32, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
  model = vit.ViT(cfg, rngs=nnx.Rngs(1))
  model.eval()
  return model


def hb_config(root, **kw):
  return ml_collections.ConfigDict({**dict(type='hummingbird', every=0, data=dict(kind='voc', root=str(root)),
                                           image_size=32, batch_size=8, num_neighbours=K, memory_chunk=16,
                                           query_block=40), **kw})


def numpy_bilinear_up(x, size):
  """(g, g, L) -> (size, size, L): half-pixel centres, edges clamped (torch align_corners=False)."""
  g = x.shape[0]
  src = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, g - 1)
  t = src - lo
  rows = x[lo] * (1 - t)[:, None, None] + x[hi] * t[:, None, None]
  return rows[:, lo] * (1 - t)[None, :, None] + rows[:, hi] * t[None, :, None]


def numpy_hummingbird(evaluator, model):
  """The protocol in NumPy on the evaluator's own (augmented) examples, reference quirks on, no matching."""
  o, patch = evaluator.opts, 8

  def examples(source, count, train):
    load = hb._LoadExample(source, o.image_size, hb.REFERENCE_STD, o.seed, 0, train=train)
    items = [load.map(i) for i in range(count)]
    images = np.stack([e['image'] for e in items])
    return np.asarray(model.features(images)), np.stack([e['mask'] for e in items])

  feats, masks = examples(evaluator.train_source, 6, True)
  memory, labels = [], []
  for f, m in zip(feats, masks):
    m = np.where(m == 255, 0, m)  # the reference: ignored pixels count as background in the memory
    for r, c in itertools.product(range(4), range(4)):
      memory.append(f[r, c])
      block = m[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].ravel()
      labels.append(np.bincount(block, minlength=21) / block.size)
  memory, labels = np.array(memory), np.array(labels)
  feats, masks = examples(evaluator.eval_source, 3, False)
  conf = np.zeros((21, 21))
  for f, m in zip(feats, masks):
    dist, _, _ = numpy_transfer(f.reshape(16, -1), memory, labels)
    pred = numpy_bilinear_up(dist.reshape(4, 4, 21), 32).argmax(-1)
    keep = m != 255
    np.add.at(conf, (m[keep], pred[keep]), 1)
  iou = np.diag(conf) / np.maximum(conf.sum(0) + conf.sum(1) - np.diag(conf), 1e-300)
  return iou.mean(), iou


def test_evaluator_equals_numpy_and_one_device(voc_root, tiny_model):
  evaluator = make_evaluator('hb', hb_config(voc_root, hungarian=False), mesh_of(jax.devices()))
  assert (evaluator.num_train, evaluator.num_val, evaluator.num_labels) == (6, 3, 21)
  out = evaluator.run(tiny_model)
  want_miou, want_iou = numpy_hummingbird(evaluator, tiny_model)
  assert out['memory_entries'] == 6 * 16
  np.testing.assert_allclose(out['per_class_iou'], want_iou, atol=1e-6)
  assert out['miou'] == pytest.approx(want_miou, abs=1e-6) and out['miou'] > 0
  one = make_evaluator('hb', hb_config(voc_root, hungarian=False), mesh_of(jax.devices()[:1])).run(tiny_model)
  np.testing.assert_array_equal(one['per_class_iou'], out['per_class_iou'])


def test_bounded_memory_keeps_the_references_share_per_image(voc_root, tiny_model):
  evaluator = make_evaluator('hb', hb_config(voc_root, memory_size=40, reference_quirks=False),
                             mesh_of(jax.devices()[:2]))
  bank = evaluator.build_memory(tiny_model)
  assert bank.size == 6 * (40 // 6)
  # Without the quirks: no extra class, the right std; the mean skips classes absent from both.
  assert evaluator.std == (0.229, 0.224, 0.225) and evaluator.ignore_as is None
  assert np.isnan(evaluator.run(tiny_model)['per_class_iou'][1])


def test_ade20k_under_the_quirks_gets_an_extra_class(tmp_path):
  base = tmp_path / 'ADEChallengeData2016'
  for split in ('training', 'validation'):
    for d in ('images', 'annotations'):
      (base / d / split).mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(base / 'images' / split / 'ADE_0.jpg')
    Image.new('L', (8, 8)).save(base / 'annotations' / split / 'ADE_0.png')
  cfg = hb_config(tmp_path, num_neighbours=3)
  cfg.data.kind = 'ade20k'
  evaluator = make_evaluator('hb', cfg, mesh_of(jax.devices()[:1]))
  assert (evaluator.num_classes, evaluator.num_labels, evaluator.ignore_as) == (150, 151, 150)
  assert evaluator.data.train_split == 'training' and evaluator.data.eval_split == 'validation'


@pytest.mark.parametrize('change, message', [
    (dict(top_k='fast'), r"config.evals.hb.top_k='fast'; expected 'exact' or 'approx'"),
    (dict(num_neighbours=0), r'config.evals.hb.num_neighbours=0; expected a positive integer'),
    (dict(memory_size=-1), r'config.evals.hb.memory_size=-1; expected a positive integer or None'),
    (dict(temperature=0.0), r'config.evals.hb.temperature=0.0; expected a positive number \(reference: 0.02\)'),
    (dict(hungarian='yes'), r"config.evals.hb.hungarian='yes'; expected True or False"),
    (dict(neighbours=30), r'config.evals.hb.neighbours is not a field of a hummingbird evaluator'),
    (dict(batch_size=6), r'config.evals.hb.batch_size=6; expected a multiple of the data-parallel size 8'),
    (dict(memory_size=12, num_neighbours=30), r'config.evals.hb.num_neighbours=30 exceeds the 12 entries a '
                                              r'memory_size of 12 keeps from 6 training images'),
    (dict(data=dict(root='/nowhere')), r'config.evals.hb.data: /nowhere/VOCdevkit/VOC2012/ImageSets/Segmentation/'
                                       r'aug.txt does not exist; expected the layout in seg_sources.py'),
    (dict(data=dict(eval_split='test')), r"config.evals.hb.data: voc split 'test'; expected one of"),
    (dict(data=dict(kind='pascal')), r"config.evals.hb.data.kind='pascal'; expected one of"),
])
def test_config_errors(voc_root, change, message):
  cfg = hb_config(voc_root)
  cfg.update(change)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    make_evaluator('hb', cfg, mesh_of(jax.devices()))
