r"""LocAtViT-S/16 on ImageNet-1k, 300 epochs, the paper's recipe (spec section 5).

Command:
  python -m locatvit_jax.main --config=configs/vit_s.py --workdir=gs://BUCKET/locatvit_s
  python -m locatvit_jax.main --config=configs/vit_s.py:vit ...   # baseline; also :gaug :prr :gap :locat_gap
  #   :reg :locat_reg (RegViT, 4 registers) :nopos :locat_nopos (no position embedding)
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: one v4-8 TPU VM or 8 GPUs; global batch 1024.
Mixup groups: 256 images on v4-8, as the authors' per-GPU batch; 128 on 8 GPUs (mixup.group_size).
Expected: the paper reports no S results (Ti and B: see configs/vit_ti.py, configs/vit_b.py).
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.classification_config('vit_s16', arg or 'locat')
