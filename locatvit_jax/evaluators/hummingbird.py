"""Hummingbird in-context segmentation (Balazevic et al., 2023) as the authors run it, on the mesh.

The protocol of evaluations/hummingbird in the authors' repository (open-hummingbird-eval, called
with patch 16, 224 px, batch 128, one augmentation epoch, k = 30 and an unbounded memory):

1. Memory. Every training image, colour-jittered (brightness, contrast, saturation, hue: each
   +-0.1 with probability 1/2) and random-resized-cropped (area 0.5-2x, ratio 3/4-4/3) to
   image_size x image_size, gives one entry per patch: the L2-normalised patch feature
   (model.features: last block, no final norm, no PRR) and the patch's label distribution (the
   fraction of its pixels in each class). With `memory_size` set, each image contributes only
   memory_size // (images x epochs) patches, the reference's sampling: patches whose classes are
   rare in the image first, ties broken by uniform noise.
2. Retrieval. Each validation image is resized to image_size x image_size; each of its patches
   takes the k nearest memory entries by inner product and averages their label distributions with
   weights softmax(cosine similarity / temperature). The grid of distributions is upsampled
   bilinearly to the image and its argmax scored against the (nearest-resized) label.
3. mIoU from the confusion matrix of the whole validation set; by default the reference first maps
   predicted classes to labels by Hungarian matching on IoU (`hungarian=False`: as predicted).

`reference_quirks` (default True: the numbers the authors report) keeps three behaviours of the
reference that differ from a clean implementation, per dataset:
* the ImageNet std it normalises with is (0.229, 0.224, 0.255), not (..., 0.225);
* ignored pixels (255) are not left out of the memory's label distributions: in VOC (and every
  dataset but ADE20K) they count as class 0, background; in ADE20K, whose raw label 0 the reference
  reads as a 151st class and ignores only when scoring, they form an extra class;
* the mean IoU is over every class of that label space, a class absent from labels and predictions
  counting 0 (so ADE20K's extra class always adds a 0 to the mean of 151).
With False: the right std, distributions over labelled pixels only, and segmentation_metrics's mean
over the classes present (as the linear-head mIoU).

At scale. The memory is a retrieval.MemoryBank, its rows (feature, label distribution) split over
every device; each block of query_block query patches is one retrieval.search (streaming top-k over
chunks of at most memory_chunk rows per device, one merge), so no device ever holds more than
query_block x memory_chunk scores. `top_k='approx'` uses jax.lax.approx_max_k inside each chunk
(the merges stay exact). Neighbours and mIoU do not depend on the number of devices or processes:
augmentation and sampling draw from (seed, epoch, image index) and ties go to the earlier entry.

Config (config.evals.NAME): type='hummingbird', every, data (DATA_FIELDS: a segmentation source as
in data/seg_sources.py), and the fields of DEFAULTS.
"""

from __future__ import annotations

import functools
import numbers

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageEnhance
from scipy.optimize import linear_sum_assignment

from locatvit_jax import sharding
from locatvit_jax.data import pipeline, seg_sources, seg_transforms, transforms
from locatvit_jax.evaluators import retrieval
from locatvit_jax.evaluators.segmentation import ConfusionAccumulator, segmentation_metrics

IGNORE = seg_sources.IGNORE_INDEX
# The reference's ImageNet std: its third entry 0.255 is a typo of 0.225 (reference_quirks).
REFERENCE_STD = (0.229, 0.224, 0.255)
# The reference's train augmentation (hbird/utils/transforms.py defaults).
JITTER, JITTER_PROB = 0.1, 0.5
CROP_SCALE, CROP_RATIO = (0.5, 2.0), (3 / 4, 4 / 3)
# Sentinel score of a patch with no labelled pixel when sampling a bounded memory (never preferred).
EMPTY_PATCH_SCORE = 1e6

DEFAULTS = dict(
    image_size=224,  # both splits are resized / cropped to this square
    batch_size=128,  # images per feature-extraction step, over all processes
    num_neighbours=30,
    temperature=0.02,
    augmentation_epochs=1,  # passes over the training images to fill the memory
    memory_size=None,  # None: every patch; else the reference's per-image sampling
    hungarian=True,
    reference_quirks=True,
    top_k='exact',  # 'exact' | 'approx' (jax.lax.approx_max_k within each chunk)
    approx_recall=0.95,
    memory_chunk=65536,  # memory rows per device per retrieval step
    query_block=4096,  # query patches per retrieval call
    num_train_images=None,  # None: all; else the first N of the training split (the demo, tests)
    num_val_images=None,
    seed=0,
)
DATA_FIELDS = ('kind', 'root', 'name', 'data_dir', 'num_classes', 'train_split', 'eval_split', 'mask_key')
# Split names per data.kind when the config leaves them out; VOC's memory is the authors' "trainaug".
DEFAULT_SPLITS = {'voc': ('aug', 'val'), 'ade20k': ('training', 'validation'), 'pcontext': ('train', 'val'),
                  'cocostuff': ('train2017', 'val2017'), 'tfds_ade20k': ('train', 'test'),
                  'tfds': ('train', 'validation')}
# reference_quirks: where the reference puts ignored pixels in the memory (module docstring).
EXTRA_CLASS_KINDS = ('ade20k', 'tfds_ade20k')


# -- label transfer ------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('k', 'temperature', 'mesh', 'approx_recall'))
def _transfer(queries, bank: retrieval.MemoryBank, *, k: int, temperature: float, mesh, approx_recall):
  """(Q, L) softmax(similarity / T)-weighted average of the k nearest entries' label distributions."""
  found = retrieval.search(queries, bank, k=k, mesh=mesh, approx_recall=approx_recall)
  weights = jax.nn.softmax(found.scores / temperature, axis=1)
  return jnp.einsum('qk,qkl->ql', weights, found.payload, precision=jax.lax.Precision.HIGHEST)


def transfer_labels(queries: np.ndarray, bank: retrieval.MemoryBank, *, k: int, temperature: float, mesh,
                    query_block: int, approx_recall: float | None = None) -> np.ndarray:
  """Label distributions (Q, L) for normalised queries (Q, C) given on every process, block by block
  (blocks padded to query_block rows, so one compilation serves every call)."""
  replicated = sharding.replicated(mesh)
  out = []
  for start in range(0, len(queries), query_block):
    block = queries[start:start + query_block]
    padded = np.pad(block, ((0, query_block - len(block)), (0, 0)))
    dist = _transfer(jax.make_array_from_process_local_data(replicated, padded), bank, k=k,
                     temperature=temperature, mesh=mesh, approx_recall=approx_recall)
    out.append(np.asarray(jax.device_get(dist))[:len(block)])
  return np.concatenate(out) if out else np.zeros((0, bank.payload.shape[1]), np.float32)


# -- patch labels and the reference's sampling ----------------------------------------------------------
def patch_label_distributions(mask: np.ndarray, patch: int, num_labels: int, ignore_as: int | None) -> np.ndarray:
  """(g*g, num_labels): per patch of a square (S, S) label map, the fraction of its labelled pixels in
  each class. ignore_as: the class ignored pixels count as (reference_quirks), or None to leave them
  out (a patch with no labelled pixel then has all zeros)."""
  g = mask.shape[0] // patch
  m = mask.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch).astype(np.int64)
  m = np.where(m == IGNORE, num_labels if ignore_as is None else ignore_as, m)  # column num_labels: dropped
  offsets = np.arange(g * g)[:, None] * (num_labels + 1)
  counts = np.bincount((m + offsets).ravel(), minlength=g * g * (num_labels + 1)).reshape(g * g, num_labels + 1)
  counts = counts[:, :num_labels].astype(np.float32)
  return counts / np.maximum(counts.sum(1, keepdims=True), 1)


def sample_patches(distributions: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
  """Indices of the `count` patches of one image the reference keeps in a bounded memory.

  A patch scores the sum, over the classes present in it, of the number of the image's patches
  that class is present in; labelled patches' scores are scaled by U(0, 1) noise; the lowest
  scores win (rare classes first). Patches with no labelled pixel score EMPTY_PATCH_SCORE."""
  present = distributions > 0
  scores = present.astype(np.float64) @ present.sum(0).astype(np.float64)
  labelled = present.any(1)
  scores = np.where(labelled, scores, EMPTY_PATCH_SCORE)
  scores[labelled] *= rng.random(int(labelled.sum()))
  return np.argsort(scores, kind='stable')[:count]


# -- matching and scores --------------------------------------------------------------------------------
def hungarian_match(conf: np.ndarray) -> np.ndarray:
  """The confusion matrix with each predicted class's column moved to the label class it is matched to
  (Hungarian assignment maximising the summed IoU); unmatched columns go to class 0, as in the reference."""
  conf = np.asarray(conf, np.float64)
  # IoU of every (label class, predicted class) pair, were that prediction relabelled as that class.
  union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf
  iou = np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)
  rows, cols = linear_sum_assignment(1.0 - iou)
  target = np.zeros(conf.shape[1], np.int64)
  target[cols] = rows
  matched = np.zeros((conf.shape[0], conf.shape[0]), np.float64)
  np.add.at(matched.T, target, conf.T)
  return matched


def reference_scores(conf: np.ndarray) -> dict:
  """The reference's mIoU: per-class IoU with 0 where a class is in neither labels nor predictions,
  averaged over every class."""
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  union = conf.sum(1) + conf.sum(0) - tp
  iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
  total = conf.sum()
  return {'miou': float(iou.mean()), 'per_class_iou': iou,
          'pixel_acc': float(tp.sum() / total) if total else float('nan')}


# -- images -------------------------------------------------------------------------------------------
def color_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """The reference's four independent jitters, in its order, each applied with probability 1/2."""
  for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
    if rng.random() < JITTER_PROB:
      image = enhance(image).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
  if rng.random() < JITTER_PROB:  # hue: shift PIL's 8-bit HSV hue, wrapping around (torchvision's adjust_hue)
    h, s, v = image.convert('HSV').split()
    shift = int(rng.uniform(-JITTER, JITTER) * 255) % 256
    h = Image.fromarray(((np.asarray(h, np.int64) + shift) % 256).astype(np.uint8), 'L')
    image = Image.merge('HSV', (h, s, v)).convert('RGB')
  return image


def augment(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator):
  """Memory augmentation: colour jitter, then one random resized crop of image and label to size x size."""
  pil = color_jitter(Image.fromarray(image), rng)
  left, top, w, h = transforms.random_resized_crop_box(pil.width, pil.height, CROP_SCALE, CROP_RATIO, rng)
  pil = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  return np.asarray(pil), seg_transforms.resize_label(mask[top:top + h, left:left + w], (size, size))


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int):
  """Validation: image (bilinear, antialiased as PIL does) and label (nearest) squashed to size x size."""
  return (np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)),
          seg_transforms.resize_label(mask, (size, size)))


class _LoadExample(grain.transforms.Map):
  """Image index -> {'image': float32 (S, S, 3) normalised, 'mask': uint8 (S, S), 'valid': bool}.

  Index -1 is a stand-in that pads a process's last batch (all ignored); a corrupt file (decoded as
  a stand-in by DecodeExample) becomes one as well. The augmentation stream is keyed by
  (seed, epoch, index), so it does not depend on how images are spread over processes."""

  def __init__(self, source, size: int, std, seed: int, epoch: int, *, train: bool):
    self.source, self.decode, self.size, self.std = source, seg_transforms.DecodeExample(source.label_map), size, std
    self.seed, self.epoch, self.train = seed, epoch, train

  def map(self, index: int) -> dict:
    example = self.decode.map(self.source[index]) if index >= 0 else None
    if example is None or example['skipped']:
      return {'image': np.zeros((self.size, self.size, 3), np.float32),
              'mask': np.full((self.size, self.size), IGNORE, np.uint8), 'valid': False}
    if self.train:
      rng = np.random.default_rng((self.seed, self.epoch, index))
      image, mask = augment(example['image'], example['mask'], self.size, rng)
    else:
      image, mask = resize_pair(example['image'], example['mask'], self.size)
    image = transforms.normalize(image, transforms.IMAGENET_MEAN, self.std)
    return {'image': image, 'mask': mask, 'valid': True}


def _batches(load: _LoadExample, count: int, batch_size: int):
  """This process's batches of batch_size / processes examples over images 0..count-1 (every process
  yields the same number of batches; the last are padded with stand-ins)."""
  shard, shards = pipeline.process_shard(None, None)
  local = batch_size // shards
  per_process = -(-count // shards)
  steps = -(-per_process // local)
  indices = list(range(shard, count, shards))
  indices += [-1] * (steps * local - len(indices))
  dataset = grain.MapDataset.source(indices).map(load)
  examples = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=2 * local)))
  for step in range(steps):
    items = [next(examples) for _ in range(local)]
    yield (indices[step * local:(step + 1) * local],
           {key: np.stack([item[key] for item in items]) for key in ('image', 'mask', 'valid')})


@functools.partial(jax.jit, static_argnums=(0, 3))
def _patch_features(graphdef, state, images, mesh):
  """L2-normalised model.features, sharded over the batch axes like `images`."""
  # stop_gradient: an evaluator reads frozen features; nothing may differentiate into the model.
  feats = jax.lax.stop_gradient(nnx.merge(graphdef, state).features(images)).astype(jnp.float32)
  feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
  return jax.lax.with_sharding_constraint(feats, sharding.batch_sharding(mesh))


@functools.partial(jax.jit, static_argnames=('size',))
def _upsampled_argmax(distributions, size: int):
  """(B, g, g, L) -> (B, size, size) class indices after bilinear upsampling (half-pixel centres, as
  torch's interpolate(mode='bilinear', align_corners=False))."""
  b, _, _, labels = distributions.shape
  up = jax.image.resize(distributions, (b, size, size, labels), 'bilinear', antialias=False)
  return jnp.argmax(up, axis=-1).astype(jnp.int32)


# -- the evaluator --------------------------------------------------------------------------------------
def _check(prefix: str, cfg) -> ml_collections.ConfigDict:
  """cfg with defaults filled in, each field checked (one ValueError naming the first bad one)."""
  allowed = {'type', 'every', 'data', *DEFAULTS}
  unknown = sorted(set(cfg) - allowed)
  if unknown:
    raise ValueError(f'{prefix}.{unknown[0]} is not a field of a hummingbird evaluator; expected fields '
                     f'among {sorted(allowed)}')
  opts = ml_collections.ConfigDict({k: cfg.get(k, v) for k, v in DEFAULTS.items()})

  def positive_int(field, allow_none=False):
    v = opts[field]
    if allow_none and v is None:
      return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
      raise ValueError(f'{prefix}.{field}={v!r}; expected a positive integer' + (' or None' if allow_none else ''))

  for field in ('image_size', 'batch_size', 'num_neighbours', 'augmentation_epochs', 'memory_chunk',
                'query_block'):
    positive_int(field)
  for field in ('memory_size', 'num_train_images', 'num_val_images'):
    positive_int(field, allow_none=True)
  if not isinstance(opts.temperature, numbers.Real) or opts.temperature <= 0:
    raise ValueError(f'{prefix}.temperature={opts.temperature!r}; expected a positive number (reference: 0.02)')
  if opts.top_k not in ('exact', 'approx'):
    raise ValueError(f"{prefix}.top_k={opts.top_k!r}; expected 'exact' or 'approx'")
  if not isinstance(opts.approx_recall, numbers.Real) or not 0 < opts.approx_recall <= 1:
    raise ValueError(f'{prefix}.approx_recall={opts.approx_recall!r}; expected a number in (0, 1]')
  for field in ('hungarian', 'reference_quirks'):
    if not isinstance(opts[field], bool):
      raise ValueError(f'{prefix}.{field}={opts[field]!r}; expected True or False')
  return opts


def _data_config(prefix: str, cfg) -> ml_collections.ConfigDict:
  data = cfg.get('data')
  if data is None or not hasattr(data, 'items'):
    raise ValueError(f'{prefix}.data is missing; expected a ConfigDict with kind ({", ".join(seg_sources.KINDS)}) '
                     'and root (folder layouts) or name (tfds)')
  unknown = sorted(set(data) - set(DATA_FIELDS))
  if unknown:
    raise ValueError(f'{prefix}.data.{unknown[0]} is not a field of a segmentation source; expected fields '
                     f'among {sorted(DATA_FIELDS)}')
  out = ml_collections.ConfigDict({f: None for f in DATA_FIELDS})
  out.update({k: v for k, v in data.items() if v is not None})
  if out.kind not in seg_sources.KINDS:
    raise ValueError(f'{prefix}.data.kind={out.kind!r}; expected one of {seg_sources.KINDS}')
  train_split, eval_split = DEFAULT_SPLITS[out.kind]
  out.train_split = out.train_split or train_split
  out.eval_split = out.eval_split or eval_split
  return out


class Evaluator:
  """Hummingbird mIoU of model.features (module docstring)."""

  def __init__(self, name: str, cfg, mesh):
    prefix = f'config.evals.{name}'
    self.name, self.every, self.mesh = name, cfg.get('every', 0), mesh
    self.opts = _check(prefix, cfg)
    self.data = _data_config(prefix, cfg)
    dp = sharding.batch_parallelism(mesh)
    if self.opts.batch_size % dp or self.opts.batch_size % jax.process_count():
      raise ValueError(f'{prefix}.batch_size={self.opts.batch_size}; expected a multiple of the data-parallel '
                       f'size {dp} and of the {jax.process_count()} processes')
    # Both splits are opened now: missing data fails before any training step.
    try:
      self.train_source = seg_sources.segmentation_source(self.data, self.data.train_split)
      self.eval_source = seg_sources.segmentation_source(self.data, self.data.eval_split)
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f'{prefix}.data: {e}') from e
    self.num_classes = self.train_source.num_classes
    o = self.opts
    self.num_train = min(len(self.train_source), o.num_train_images or len(self.train_source))
    self.num_val = min(len(self.eval_source), o.num_val_images or len(self.eval_source))
    # The label space: the dataset's classes, plus ADE20K's unlabelled class under the reference's quirks.
    quirks = o.reference_quirks
    extra = quirks and self.data.kind in EXTRA_CLASS_KINDS
    self.num_labels = self.num_classes + extra
    self.ignore_as = (self.num_classes if extra else 0) if quirks else None
    self.std = REFERENCE_STD if quirks else transforms.IMAGENET_STD
    # The reference's patches per image of a bounded memory.
    self.per_image = (None if o.memory_size is None
                      else max(1, o.memory_size // (self.num_train * o.augmentation_epochs)))
    # (An unbounded memory's size depends on the model's patch grid: build_memory checks it.)
    if self.per_image is not None and self.num_train * o.augmentation_epochs * self.per_image < o.num_neighbours:
      raise ValueError(f'{prefix}.num_neighbours={o.num_neighbours} exceeds the '
                       f'{self.num_train * o.augmentation_epochs * self.per_image} entries a memory_size of '
                       f'{o.memory_size} keeps from {self.num_train} training images; expected fewer neighbours '
                       'or a larger memory')

  def _features(self, graphdef, state, images: np.ndarray) -> np.ndarray:
    """This process's (b, g, g, C) normalised features of its local batch."""
    feats = _patch_features(graphdef, state, sharding.to_global({'image': images}, self.mesh)['image'], self.mesh)
    # The inverse of to_global: the rows this process fed in.
    return np.asarray(multihost_utils.global_array_to_host_local_array(feats, self.mesh, P(sharding.BATCH_AXES)))

  def build_memory(self, model) -> retrieval.MemoryBank:
    o = self.opts
    graphdef, state = nnx.split(model)
    feats, labels = [], []
    for epoch in range(o.augmentation_epochs):
      load = _LoadExample(self.train_source, o.image_size, self.std, o.seed, epoch, train=True)
      for indices, batch in _batches(load, self.num_train, o.batch_size):
        f = self._features(graphdef, state, batch['image'])
        patch = o.image_size // f.shape[1]  # the feature map's stride, whatever the model family
        for index, fi, mask, valid in zip(indices, f, batch['mask'], batch['valid']):
          if not valid:
            continue
          dist = patch_label_distributions(mask, patch, self.num_labels, self.ignore_as)
          fi = fi.reshape(-1, fi.shape[-1])
          if self.per_image is not None:
            keep = sample_patches(dist, self.per_image, np.random.default_rng((o.seed, epoch, index, 1)))
            fi, dist = fi[keep], dist[keep]
          feats.append(fi)
          labels.append(dist)
    # A process may hold no entry (more processes than images, corrupt files): it pads only.
    bank = retrieval.make_memory_bank(np.concatenate(feats) if feats else np.zeros((0, f.shape[-1]), np.float32),
                            np.concatenate(labels) if labels else np.zeros((0, self.num_labels), np.float32),
                            self.mesh, memory_chunk=o.memory_chunk, k=o.num_neighbours)
    if bank.size < o.num_neighbours:
      raise ValueError(f'config.evals.{self.name}: the memory holds {bank.size} entries (corrupt training '
                       f'images are skipped); expected at least num_neighbours={o.num_neighbours}')
    return bank

  def predict(self, model, bank: retrieval.MemoryBank):
    """Yields (predictions (b, S, S) int32, labels (b, S, S) uint8) of this process's validation batches."""
    o = self.opts
    graphdef, state = nnx.split(model)
    load = _LoadExample(self.eval_source, o.image_size, self.std, o.seed, 0, train=False)
    approx = o.approx_recall if o.top_k == 'approx' else None
    for _, batch in _batches(load, self.num_val, o.batch_size):
      f = self._features(graphdef, state, batch['image'])
      b, g, _, c = f.shape
      queries = f.reshape(-1, c)
      if jax.process_count() > 1:  # every process retrieves for all processes' queries (replicated)
        queries = np.asarray(multihost_utils.process_allgather(queries)).reshape(-1, c)
      dist = transfer_labels(queries, bank, k=o.num_neighbours, temperature=float(o.temperature), mesh=self.mesh,
                             query_block=o.query_block, approx_recall=approx)
      if jax.process_count() > 1:
        dist = dist.reshape(jax.process_count(), -1, dist.shape[-1])[jax.process_index()]
      pred = np.asarray(_upsampled_argmax(jnp.asarray(dist.reshape(b, g, g, -1)), o.image_size))
      yield pred, batch['mask']  # stand-ins' labels are all ignored

  def run(self, model) -> dict:
    bank = self.build_memory(model)
    conf = ConfusionAccumulator(self.num_labels)
    for pred, label in self.predict(model, bank):
      conf.update(pred, label)
    conf = conf.result()
    if self.opts.hungarian:
      conf = hungarian_match(conf)
    scores = reference_scores(conf) if self.opts.reference_quirks else segmentation_metrics(conf)
    return {'miou': scores['miou'], 'per_class_iou': scores['per_class_iou'], 'pixel_acc': scores['pixel_acc'],
            'memory_entries': float(bank.size)}
