r"""LocAtViT-Ti/16 on ImageNet-1k, 300 epochs, the paper's recipe (spec section 5).

Command:
  python -m locatvit_jax.main --config=configs/vit_ti.py --workdir=gs://BUCKET/locatvit_ti
  python -m locatvit_jax.main --config=configs/vit_ti.py:vit ...   # baseline; also :gaug :prr :gap :locat_gap
  #   :reg :locat_reg (RegViT, 4 registers) :nopos :locat_nopos (no position embedding)
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: one v4-8 TPU VM or 8 GPUs (bf16: --config.model.dtype=bfloat16); global batch 1024.
Mixup groups: 256 images on v4-8, as the authors' per-GPU batch; 128 on 8 GPUs (mixup.group_size).
Expected: ImageNet-1k top-1 ViT-Ti 72.39 -> LocAtViT-Ti 73.94; frozen-backbone ADE20K mIoU
17.30 -> 23.47 (paper, section 7 of the spec); RegViT-Ti (:reg -> :locat_reg) ADE20K 15.98 -> 24.39
(the paper's RegViT rows, as issue #15 quotes them).
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.classification_config('vit_ti16', arg or 'locat')
