"""Random-access classification sources: TFDS ArrayRecord datasets and image folders.

Every source has `len()`, `num_classes` and `source[i] -> {'image', 'label': int, 'key': str}`; the
image is encoded bytes (decoded later, in the Grain workers, where a corrupt file can be skipped) or
an already decoded uint8 array. `key` names the example (file path or dataset index) in messages.
"""

from __future__ import annotations

from locatvit_jax import paths

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')
SOURCE_KINDS = ('tfds', 'folder')
# The evaluation split of each kind when data.eval_split is empty: TFDS ImageNet names it
# 'validation', an ImageNet-style folder 'val' (README: DIR/train/CLASS/..., DIR/val/CLASS/...).
DEFAULT_EVAL_SPLIT = {'tfds': 'validation', 'folder': 'val'}


class TfdsSource:
  """A TFDS split prepared as ArrayRecord, read without TensorFlow through `tfds.data_source`."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds

    self._tfds = tfds.data_source(name, split=split, data_dir=data_dir)
    # Ask for the encoded image bytes only after construction: decoders passed to
    # tfds.data_source make tfds.testing.mock_data need TensorFlow, and the mock ignores them
    # here, so tests see decoded arrays while real data stays encoded until our decode step.
    self._tfds.decoders = {'image': tfds.decode.SkipDecoding()}
    self.num_classes = self._tfds.dataset_info.features['label'].num_classes
    self._prefix = f'{name}/{split}'

  def __len__(self) -> int:
    return len(self._tfds)

  def __getitem__(self, index: int) -> dict:
    record = self._tfds[index]
    key = f'{self._prefix}[{index}]'
    if 'file_name' in record:
      file_name = record['file_name']
      key += f' ({file_name.decode() if isinstance(file_name, bytes) else file_name})'
    return {'image': record['image'], 'label': int(record['label']), 'key': key}

  def __repr__(self) -> str:
    return f'TfdsSource({self._prefix}, {len(self)} examples)'


class ImageFolderSource:
  """`root/<class>/<image>` (local or gs://): labels are the indices of the sorted class folder names."""

  def __init__(self, root: str):
    if not paths.path(root).is_dir():
      raise ValueError(f'image folder {root!r} does not exist; expected root/<class>/<images>')
    self.root = root
    class_dirs = sorted((d for d in paths.path(root).iterdir() if d.is_dir()), key=lambda d: d.name)
    self.classes = [d.name for d in class_dirs]
    self.files: list[tuple[str, int]] = []
    for label, class_dir in enumerate(class_dirs):
      self.files += [(str(f), label) for f in sorted(class_dir.iterdir(), key=lambda f: f.name)
                     if f.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not self.files:
      raise ValueError(f'image folder {root!r} has no images in class subfolders; expected '
                       f'root/<class>/<image> with extensions {IMAGE_EXTENSIONS}')
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    path, label = self.files[index]
    return {'image': paths.read_bytes(path), 'label': label, 'key': path}

  def __repr__(self) -> str:
    return f'ImageFolderSource({self.root!r}, {len(self)} images, {self.num_classes} classes)'


def tfds_source(name: str, split: str, data_dir: str | None = None) -> TfdsSource:
  return TfdsSource(name, split, data_dir)


def image_folder_source(root: str) -> ImageFolderSource:
  return ImageFolderSource(root)


def eval_split(data_cfg) -> str:
  """data_cfg.eval_split, or the default of data_cfg.kind."""
  return data_cfg.get('eval_split') or DEFAULT_EVAL_SPLIT.get(data_cfg.kind, '')


def classification_source(data_cfg, split: str):
  """The source `data_cfg` describes, for split name `split` (data_cfg.train_split or eval_split).

  kind 'tfds': TFDS dataset `data_cfg.name` in `data_cfg.data_dir`; kind 'folder': the image
  folder `data_cfg.root/<split>`. When `data_cfg.num_classes` is set, the source must agree with it
  (a folder split missing a class would silently shift every later label).
  """
  if data_cfg.kind == 'tfds':
    source = tfds_source(data_cfg.name, split, data_cfg.get('data_dir'))
  elif data_cfg.kind == 'folder':
    if not data_cfg.get('root'):
      raise ValueError("data.kind='folder' needs data.root (a folder with one subfolder per split)")
    split_dir = paths.path(data_cfg.root) / split
    if not split_dir.is_dir():
      raise ValueError(f'split {split!r}: {split_dir} does not exist; expected data.root/<split>/<class>/<images> '
                       '(data.train_split, data.eval_split)')
    source = image_folder_source(str(split_dir))
  else:
    raise ValueError(f'data.kind={data_cfg.kind!r}; expected one of {SOURCE_KINDS}')
  expected = data_cfg.get('num_classes')
  if expected and source.num_classes != expected:
    raise ValueError(f'{source!r} has {source.num_classes} classes but data.num_classes={expected}')
  return source
