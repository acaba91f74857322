r"""LocAtViT-L/16 on ImageNet-1k, 300 epochs, the paper's recipe (spec section 5).

Command:
  python -m locatvit_jax.main --config=configs/vit_l.py --workdir=gs://BUCKET/locatvit_l
  python -m locatvit_jax.main --config=configs/vit_l.py:vit ...   # baseline; also :gaug :prr :gap :locat_gap
  #   :reg :locat_reg (RegViT, 4 registers) :nopos :locat_nopos (no position embedding)
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: a v4-64 TPU pod slice or 8 nodes x 8 GPUs, with --config.mesh.fsdp=8; global batch 1024.
Mixup groups: a device's 32 (v4-64) or 16 (GPUs) images; mixup.group_size=256 caps them.
Expected: the paper reports no L results (Ti and B: see configs/vit_ti.py, configs/vit_b.py).
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.classification_config('vit_l16', arg or 'locat')
