"""Segmentation datasets as random-access sources for Grain: file layouts and label conventions.

A source has `len()`, `source[i]` and three attributes:
  `label_map`    how the stored label values become classes 0..K-1 or 255 (ignored),
  `num_classes`  K,
  `name`         for messages.
`source[i]` is {'image': encoded image bytes or uint8 (H, W, 3), 'mask': encoded PNG bytes or uint8
(H, W) of stored label values, 'key': the image's name, 'mask_key': the label's name}. Decoding, the
size check and the label mapping happen in `seg_transforms.DecodeExample`, inside the loader's
workers; a label without its file is found here, when the source is built.

Layouts and conventions (mmsegmentation's, so results compare with the paper):
  ade20k     ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/NAME.{jpg,png};
             150 classes stored as 1..150, 0 = unlabelled: reduce-zero-label.
  voc        ROOT/VOCdevkit/VOC2012/{JPEGImages/ID.jpg, ImageSets/Segmentation/SPLIT.txt} with labels
             SegmentationClass/ID.png (splits train, val, trainval) or, for split 'aug' (the 10,582
             "trainaug" images), SegmentationClassAug/ID.png listed in aug.txt, as mmseg's voc_aug.py
             converter writes them: 21 classes (0 = background) stored as 0..20, 255 on object
             borders; kept as they are.
  pcontext   ROOT/VOCdevkit/VOC2010/{JPEGImages/ID.jpg, SegmentationClassContext/ID.png,
             ImageSets/SegmentationContext/{train,val}.txt} as mmseg's pascal_context.py converter
             writes it: 59 classes stored as 1..59, 0 = background: reduce-zero-label.
  cocostuff  ROOT/{images,annotations}/{train2017,val2017}/ with labels NAME_labelTrainIds.png as
             mmseg's coco_stuff164k.py converter writes them: the 171 classes already stored as 0..170
             and 255 for unlabelled pixels and COCO ids outside the 171; kept as they are.
  tfds       any TFDS dataset with 'image' and a label feature (data.name, data.mask_key) already
             in classes 0..K-1 or 255, e.g. the demo's digit scenes.
  tfds_ade20k  TFDS `scene_parse150` (splits 'train', 'test' = ADE20K validation images). Its labels
             are NOT the 150-class scene-parsing benchmark: TFDS builds them from the Places Challenge
             2017 `annotations_instance` PNGs, whose red channel is one of the 100 instance
             categories (1..100, 0 = none of them). We read that channel: 100 classes,
             reduce-zero-label. Use it for pipeline checks, not to compare with the paper's ADE20K.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from etils import epath

from locatvit_jax import paths

# The label value that marks pixels no class is scored on (unlabelled, padding): the datasets' and
# mmseg's convention, and the one place the rest of the package takes it from.
IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True, eq=False)
class LabelMap:
  """A 256-entry lookup from stored label values to classes 0..num_classes-1 or IGNORE_INDEX."""
  lut: np.ndarray  # (256,) uint8
  num_classes: int

  def __call__(self, stored: np.ndarray, key: str) -> np.ndarray:
    """Maps a uint8 label image; a value that maps to neither a class nor 255 is a data error."""
    mapped = self.lut[stored]
    bad = (mapped >= self.num_classes) & (mapped != IGNORE_INDEX)
    if bad.any():
      values = np.unique(stored[bad]).tolist()
      raise ValueError(f'{key}: label values {values} are out of range; expected values that map to '
                       f'classes 0..{self.num_classes - 1} or {IGNORE_INDEX} (ignored)')
    return mapped


def reduce_zero_label(num_classes: int) -> LabelMap:
  """mmseg's reduce_zero_label: 0 (unlabelled) -> ignored, k -> k - 1, and 255 stays ignored."""
  lut = np.arange(256) - 1
  lut[[0, 255]] = IGNORE_INDEX
  return LabelMap(lut.astype(np.uint8), num_classes)


def identity_labels(num_classes: int) -> LabelMap:
  return LabelMap(np.arange(256, dtype=np.uint8), num_classes)


class PairedFilesSource:
  """Image files and their label PNGs, read as bytes (decoding happens in the loader's workers)."""

  def __init__(self, name: str, pairs: Sequence[tuple[str, str]], label_map: LabelMap):
    if not pairs:
      raise ValueError(f'{name}: no images found; expected the layout in seg_sources.py')
    self.name = name
    self.label_map = label_map
    self.num_classes = label_map.num_classes
    self._pairs = list(pairs)

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> dict:
    image_path, mask_path = self._pairs[index]
    return {'image': paths.read_bytes(image_path), 'mask': paths.read_bytes(mask_path),
            'key': image_path, 'mask_key': mask_path}

  def __repr__(self) -> str:
    return f'PairedFilesSource({self.name}, {len(self)} examples)'


class TfdsSegmentationSource:
  """A TFDS dataset of images and label maps, read through `tfds.data_source` (ArrayRecord).

  The stored label plane is channel `mask_channel` of feature `mask_key` (features stored as
  (H, W, 1) or (H, W, 3) images; plain attributes, so the source pickles into Grain workers).
  """

  def __init__(self, name: str, split: str, data_dir: str | None, label_map: LabelMap,
               mask_key: str, mask_channel: int = 0):
    self.name = f'{name}:{split}'
    self.label_map = label_map
    self.num_classes = label_map.num_classes
    self._mask_key, self._mask_channel = mask_key, mask_channel
    import tensorflow_datasets as tfds  # here, not at the top: only these sources need its slow import
    # download=False: a missing dataset is an error here, never a download at training time.
    self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    example = self._source[index]
    key = f'{self.name}[{index}]'
    mask = example[self._mask_key]
    mask = mask[..., self._mask_channel] if mask.ndim == 3 else mask
    return {'image': example['image'], 'mask': mask,
            'key': key, 'mask_key': f'{key} {self._mask_key}'}

  def __repr__(self) -> str:
    return f'TfdsSegmentationSource({self.name}, {len(self)} examples)'


SCENE_PARSE150_SPLITS = ('train', 'test')


def scene_parse150_source(split: str, data_dir: str | None) -> TfdsSegmentationSource:
  """TFDS scene_parse150; the mask is the annotation's red channel (see the module docstring)."""
  if split not in SCENE_PARSE150_SPLITS:
    raise ValueError(f'tfds_ade20k split {split!r}; expected one of {SCENE_PARSE150_SPLITS}')
  return TfdsSegmentationSource('scene_parse150', split, data_dir, reduce_zero_label(100), 'annotation')


def tfds_source(data_cfg, split: str) -> TfdsSegmentationSource:
  """Any TFDS dataset with 'image' and a single-channel label feature (data_cfg.mask_key) whose
  values are already classes 0..num_classes-1 (or 255), such as the demo's digit scenes."""
  return TfdsSegmentationSource(data_cfg.name, split, data_cfg.get('data_dir'),
                                identity_labels(data_cfg.num_classes), data_cfg.get('mask_key') or 'mask')


# -- folder layouts --------------------------------------------------------------------------------
def _require_dir(path, what: str) -> epath.Path:
  path = paths.path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'{what} folder {path} does not exist; expected the layout in seg_sources.py')
  return path


def _require_split(dataset: str, split: str, splits: tuple[str, ...]) -> None:
  if split not in splits:
    raise ValueError(f'{dataset} split {split!r}; expected one of {splits}')


def _pair_by_name(image_dir: epath.Path, mask_dir: epath.Path, image_suffix: str, mask_suffix: str,
                  names: Sequence[str] | None = None) -> list[tuple[str, str]]:
  """(image, label) paths for `names` (default: every image in image_dir); a missing file fails."""
  image_files = {f.name for f in image_dir.iterdir()}
  mask_files = {f.name for f in mask_dir.iterdir()}
  if names is None:
    names = sorted(f[:-len(image_suffix)] for f in image_files if f.endswith(image_suffix))
  pairs = []
  for name in names:
    image, mask = name + image_suffix, name + mask_suffix
    if image not in image_files:
      raise FileNotFoundError(f'{image_dir / image} is missing; the split lists {name!r}')
    if mask not in mask_files:
      raise FileNotFoundError(f'{mask_dir / mask} is missing; expected a label PNG for image {image_dir / image}')
    pairs.append((str(image_dir / image), str(mask_dir / mask)))
  return pairs


def ade20k_source(root: str, split: str) -> PairedFilesSource:
  _require_split('ade20k', split, ('training', 'validation'))
  base = paths.path(root) / 'ADEChallengeData2016'
  image_dir = _require_dir(base / 'images' / split, 'ADE20K images')
  mask_dir = _require_dir(base / 'annotations' / split, 'ADE20K annotations')
  return PairedFilesSource(f'ade20k:{split}', _pair_by_name(image_dir, mask_dir, '.jpg', '.png'),
                           reduce_zero_label(150))


def _split_names(list_file: epath.Path) -> list[str]:
  if not list_file.is_file():
    raise FileNotFoundError(f'{list_file} does not exist; expected the layout in seg_sources.py')
  return [line.strip() for line in paths.read_text(list_file).splitlines() if line.strip()]


def voc_source(root: str, split: str) -> PairedFilesSource:
  _require_split('voc', split, ('train', 'val', 'trainval', 'aug'))
  base = paths.path(root) / 'VOCdevkit' / 'VOC2012'
  names = _split_names(base / 'ImageSets' / 'Segmentation' / f'{split}.txt')
  image_dir = _require_dir(base / 'JPEGImages', 'Pascal VOC images')
  labels = 'SegmentationClassAug' if split == 'aug' else 'SegmentationClass'
  mask_dir = _require_dir(base / labels, 'Pascal VOC labels')
  return PairedFilesSource(f'voc:{split}', _pair_by_name(image_dir, mask_dir, '.jpg', '.png', names),
                           identity_labels(21))


def pcontext_source(root: str, split: str) -> PairedFilesSource:
  _require_split('pcontext', split, ('train', 'val'))
  base = paths.path(root) / 'VOCdevkit' / 'VOC2010'
  names = _split_names(base / 'ImageSets' / 'SegmentationContext' / f'{split}.txt')
  image_dir = _require_dir(base / 'JPEGImages', 'PASCAL-Context images')
  mask_dir = _require_dir(base / 'SegmentationClassContext', 'PASCAL-Context labels')
  return PairedFilesSource(f'pcontext:{split}', _pair_by_name(image_dir, mask_dir, '.jpg', '.png', names),
                           reduce_zero_label(59))


def cocostuff_source(root: str, split: str) -> PairedFilesSource:
  _require_split('cocostuff', split, ('train2017', 'val2017'))
  image_dir = _require_dir(paths.path(root) / 'images' / split, 'COCO-Stuff images')
  mask_dir = _require_dir(paths.path(root) / 'annotations' / split, 'COCO-Stuff annotations')
  pairs = _pair_by_name(image_dir, mask_dir, '.jpg', '_labelTrainIds.png')
  return PairedFilesSource(f'cocostuff:{split}', pairs, identity_labels(171))


_FOLDER_SOURCES = {'ade20k': ade20k_source, 'voc': voc_source, 'pcontext': pcontext_source,
                   'cocostuff': cocostuff_source}
KINDS = (*_FOLDER_SOURCES, 'tfds_ade20k', 'tfds')


def segmentation_source(data_cfg, split: str):
  """The source for `data_cfg.kind` (see the module docstring) and one split."""
  kind = data_cfg.kind
  if kind == 'tfds_ade20k':
    source = scene_parse150_source(split, data_cfg.get('data_dir'))
  elif kind == 'tfds':
    source = tfds_source(data_cfg, split)
  elif kind in _FOLDER_SOURCES:
    if not data_cfg.get('root'):
      raise ValueError(f'data.root is not set; expected the folder that holds the {kind} dataset')
    source = _FOLDER_SOURCES[kind](data_cfg.root, split)
  else:
    raise ValueError(f'data.kind={kind!r}; expected one of {KINDS}')
  expected = data_cfg.get('num_classes')
  if expected is not None and expected != source.num_classes:
    raise ValueError(f'data.num_classes={expected} but {source.name} has {source.num_classes} classes')
  return source
