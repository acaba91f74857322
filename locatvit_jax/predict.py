"""Classify your own images with any checkpoint `locatvit_jax.load` reads.

    python -m locatvit_jax.predict --init=CKPT IMAGE [IMAGE ...] [--top=5] [--pictures=DIR]
                                   [--prr=true|false] [--ema] [--trust-pickle]

prints, per image, its path and then one line per top class, most probable first:
`  <softmax probability, 4 decimals>  <class name>`. Class names come from class_names.txt beside
the checkpoint (the classification trainer writes it into its exports when the data names its
classes, as image folders do), else ImageNet-1k's names for a 1000-class model, else the class index.
`--pictures=DIR` also draws, per image, the GAug kernels (models with GAug) and the attention maps
of a few blocks and query patches into DIR (viz.py). Bad input: one `error: ...` line, exit status 2.
`--prr`, `--ema` and `--trust-pickle` state what CKPT cannot tell, as for `locatvit_jax.convert`.

`preprocess(images, model)` (also `locatvit_jax.preprocess`) is the model's evaluation transform.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from locatvit_jax import checkpoint, loading, paths, viz
from locatvit_jax.configs import common
from locatvit_jax.data import transforms
from locatvit_jax.models import vit

# Images per forward pass: bounds the memory of long image lists.
BATCH_SIZE = 32
IMAGENET_CLASSES = 1000


# -- the evaluation transform ----------------------------------------------------------------------
def eval_resize(img_size: int) -> int:
  """The short side an image is resized to before the centre crop of `img_size`.

  The recipe resizes to aug.eval_resize = 248 for its 224 px crop, i.e. keeps 224/248 ~ 0.9 of the short
  side (timm's crop_pct); other sizes keep that fraction, rounded down as timm does.
  """
  t = common.eval_transform()
  return img_size * t['eval_resize'] // t['img_size']


def _square_size(model) -> int:
  height, width = model.cfg.img_size
  if height != width:
    raise ValueError(f"the model takes {height}x{width} images; preprocess (like the trainer's evaluation) "
                     'centre-crops squares only')
  return height


def _to_rgb(image) -> Image.Image:
  if isinstance(image, np.ndarray) and (image.dtype != np.uint8 or image.ndim not in (2, 3)
                                        or image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
    raise ValueError(f'image array of shape {image.shape} and dtype {image.dtype}; expected uint8 pixels '
                     '(H, W) or (H, W, 1|3|4)')
  return transforms.to_rgb(image)


def preprocess(images, model) -> np.ndarray:
  """User images -> the float32 (N, S, S, 3) batch `model(batch)` expects, S = the model's img_size.

  `images`: a PIL image (any mode: grey, RGBA, palette...) or a uint8 array (H, W[, C]), or a list
  of them, of any size. Each goes through the classification trainer's evaluation transform
  (transforms.eval_transform): RGB (alpha dropped), bicubic resize of the short side to
  eval_resize(S), centre crop S x S, (x / 255 - mean) / std with the recipe's mean and std for the
  model's family. A model trained with other aug.mean, aug.std or aug.eval_resize needs its own
  preprocessing.
  """
  batch = [images] if isinstance(images, (Image.Image, np.ndarray)) else list(images)
  if not batch:
    raise ValueError('no images given; expected a PIL image, a uint8 array, or a list of them')
  size = _square_size(model)
  t = common.eval_transform(model.cfg.FAMILY)
  return np.stack([transforms.eval_transform(_to_rgb(im), size, eval_resize(size), t['mean'], t['std'])
                   for im in batch])


# -- classes --------------------------------------------------------------------------------------------
def imagenet_class_names() -> list[str]:
  """ImageNet-1k's class names in label order ('tench, Tinca tinca', ...), from the list tensorflow_datasets
  installs with its SI-Score dataset (a dependency already; nothing is downloaded).

  Imported on demand: tensorflow_datasets takes a while to import and only 1000-class models need it.
  """
  from tensorflow_datasets.datasets.siscore import labels
  return list(labels.IMAGENET_LABELS_LIST)


def class_names(init, num_classes: int) -> list[str] | None:
  """class_names.txt in the checkpoint's folder, else ImageNet-1k's names for 1000 classes, else None."""
  folder = paths.path(init)
  listed = (folder if folder.is_dir() else folder.parent) / checkpoint.CLASS_NAMES_FILE
  if listed.exists():
    names = paths.read_text(listed).splitlines()
    if len(names) != num_classes:
      raise ValueError(f'{listed} has {len(names)} lines but the model has {num_classes} classes; '
                       'expected one class name per line')
    return names
  return imagenet_class_names() if num_classes == IMAGENET_CLASSES else None


@nnx.jit
def _softmax(model, images):
  # Compiled: the first eager call of a model compiles op by op, several times slower.
  return jax.nn.softmax(model(images).astype(jnp.float32), axis=-1)


def probabilities(model, batch: np.ndarray) -> np.ndarray:
  """Softmax over the classes, (N, num_classes) float32."""
  return np.concatenate([_softmax(model, batch[i:i + BATCH_SIZE]) for i in range(0, len(batch), BATCH_SIZE)])


def top_lines(probs: np.ndarray, names: list[str] | None, top: int) -> list[str]:
  best = np.argsort(-probs, kind='stable')[:top]  # ties: the lower class index first
  return [f'  {probs[c]:.4f}  {names[c] if names else c}' for c in best]


# -- pictures ---------------------------------------------------------------------------------------------
def picture_layers(depth: int) -> list[int]:
  """The first, a middle and the last block, to show how kernels and attention change with depth."""
  return sorted({0, depth // 2, depth - 1})


def picture_queries(grid: tuple[int, int]) -> list[tuple[int, int]]:
  """Patches a quarter, half and three quarters along the diagonal: the centre and two off-centre queries."""
  h, w = grid
  return list(dict.fromkeys([(h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 4)]))


def save_pictures(directory, stem: str, model, x: np.ndarray) -> list[str]:
  """GAug kernels (when the model has GAug) and attention maps of one model input `x` (S, S, 3)."""
  layers, queries = picture_layers(model.cfg.depth), picture_queries(model.cfg.grid)
  folder = paths.path(directory)
  saved = []
  if model.cfg.gaug:
    saved.append(viz.save_gaug_kernels(folder / f'{stem}_gaug_kernels.png', model, x, layers, queries))
  saved.append(viz.save_attention_maps(folder / f'{stem}_attention.png', model, x, layers, queries))
  return [str(p) for p in saved]


# -- command line -----------------------------------------------------------------------------------------
def read_image(path) -> Image.Image:
  """An image file (local or gs://) decoded to RGB; ValueError naming the file when it is missing or no image."""
  try:
    data = paths.read_bytes(path)
  except FileNotFoundError:
    raise ValueError(f'{path}: no such file') from None
  try:
    return transforms.to_rgb(data)
  except Image.UnidentifiedImageError:
    raise ValueError(f'{path}: not an image (no format Pillow reads)') from None
  except transforms.DECODE_ERRORS as e:
    raise ValueError(f'{path}: not a readable image ({e})') from e


def load_classifier(init, **load_args):
  model = loading.load(init, **load_args)
  if not model.cfg.num_classes:
    raise ValueError(f'{init} holds a model without a classification head (num_classes=0)')
  return model


def run(args) -> None:
  if args.top < 1:
    raise ValueError(f'--top={args.top}; expected at least 1')
  images = [read_image(p) for p in args.images]  # a bad file fails before the slow model load
  model = load_classifier(args.init, **loading.load_flags(args))
  if args.pictures and model.cfg.FAMILY != vit.FAMILY:
    raise ValueError(f'--pictures draws ViT-family attention; {args.init} holds a {model.cfg.FAMILY} model')
  names = class_names(args.init, model.cfg.num_classes)
  batch = preprocess(images, model)
  for i, (path, probs) in enumerate(zip(args.images, probabilities(model, batch))):
    print(path)
    print('\n'.join(top_lines(probs, names, args.top)))
    if args.pictures:
      # The position keeps two images of the same name apart.
      for saved in save_pictures(args.pictures, f'{i}_{paths.path(path).stem}', model, batch[i]):
        print(f'  saved {saved}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m locatvit_jax.predict', description=__doc__.split('\n\n')[0])
  parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files (local or gs://)')
  parser.add_argument('--init', required=True, metavar='CKPT',
                      help='anything locatvit_jax.load reads: our export or workdir, .safetensors, .pth(.tar), '
                      'HF-style dir')
  parser.add_argument('--top', type=int, default=5, help='classes to print per image (default 5)')
  parser.add_argument('--pictures', metavar='DIR', help='also save GAug kernel and attention pictures here')
  loading.add_load_flags(parser)
  args = parser.parse_args(argv)
  try:
    run(args)
  except (ValueError, OSError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
