r"""LocAtViT-B/16 on ImageNet-1k, 300 epochs, the paper's recipe (spec section 5).

Command:
  python -m locatvit_jax.main --config=configs/vit_b.py --workdir=gs://BUCKET/locatvit_b
  python -m locatvit_jax.main --config=configs/vit_b.py:vit ...   # baseline; also :gaug :prr :gap :locat_gap
  #   :reg :locat_reg (RegViT, 4 registers) :nopos :locat_nopos (no position embedding)
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: a v4-32 TPU pod slice (4 hosts) or 4 nodes x 8 GPUs; global batch 1024.
Mixup groups: a device's 64 (v4-32) or 32 (GPUs) images; the authors' 4 GPUs mixed 256 (mixup.group_size).
Expected: ImageNet-1k top-1 ViT-B 80.99 -> LocAtViT-B 82.31; frozen-backbone ADE20K mIoU
28.40 -> 32.64 (paper, section 7 of the spec).
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.classification_config('vit_b16', arg or 'locat')
