"""Shared test setup: 8 fake CPU devices, absl flags marked parsed, paths to the shared fixtures."""

import os
import pathlib
import sys

# Must be set before JAX initialises its backends; tests that need one device use a sub-mesh.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain workers and absl-using modules read flags; pytest never calls app.run().
flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


@pytest.fixture(scope='session')
def parity_dir() -> pathlib.Path:
  d = SHARED / 'parity' / 'locatvit_tiny_random'
  if not d.is_dir():
    pytest.fail(f'{d} is missing: CI runs with ../shared beside the checkout')
  return d


def tiny_classification_config(data_root: str | None = None, **overrides):
  """configs/vit_ti.py shrunk to seconds: width 32, depth 2, 32 px, batch 8, a few steps."""
  from configs import common
  c = common.classification_config('ti', 'locat')
  c.model.update(dict(img_size=32, width=32, depth=2, num_heads=2, mlp_dim=64, drop_path=0.1))
  c.aug.eval_resize = 36
  if data_root:
    c.data.update(dict(kind='folder', root=data_root, train_split='train', eval_split='val', num_classes=4))
  c.input.worker_count = 0
  c.batch_size = c.eval_batch_size = 8
  c.total_steps, c.warmup_steps = 6, 2
  c.optim.update(dict(lr=1e-3, lr_base_batch=8, warmup_init_lr=0.0, end_lr=0.0))
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
  c.export_best = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def make_image_folder(root: pathlib.Path, *, classes=4, per_class=6, size=40, splits=('train', 'val')):
  """A tiny ImageNet-style folder: root/SPLIT/CLASS/*.png; each class has its own colour."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in splits:
    for c in range(classes):
      d = root / split / f'class_{c}'
      d.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        base = np.array([60 * c, 255 - 60 * c, 120], np.float64)
        img = np.clip(base + rng.normal(0, 40, (size, size + 8 * (i % 3), 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f'{i}.png')
  return root


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory) -> pathlib.Path:
  return make_image_folder(tmp_path_factory.mktemp('folder_data'))
