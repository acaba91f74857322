r"""LocAt Swin-T on ImageNet-1k, 300 epochs: the authors' recipe (spec sections 5 and 8).

Swin-T (models/swin.py): width 96, depths 2-2-6-2, heads 3-6-12-24, patch 4, window 7. LocAt adds GAug
inside every window attention (on the 7 x 7 window, on top of the relative position bias and the shift
mask) and PRR on the last stage before the average pooling. The authors train it with the same train.py
defaults as LocAtViT (their README and train.sh: AdamW lr 5e-4 per 512 images, so 1e-3 at their batch of
4 x 256, weight decay 0.05, clip 5, 20 warmup epochs then linear decay, RandAugment, mixup/cutmix, label
smoothing 0.1), drop path 0.1 (their rule for names with 'tiny'), and timm's Swin data config: ImageNet
mean and std (models.swin.NORMALIZATION), the 248 -> 224 evaluation crop.

Command:
  python -m locatvit_jax.main --config=configs/swin_t.py --workdir=gs://BUCKET/locatswin_tiny
  python -m locatvit_jax.main --config=configs/swin_t.py:vit ...   # plain Swin-T baseline; also :gaug :prr
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: one v4-8 TPU VM or 8 GPUs (bf16: --config.model.dtype=bfloat16); global batch 1024
(Swin-T is 4.5 GFLOPs per image, between ViT-S and ViT-B).
Mixup groups: 256 images on v4-8, as the authors' per-GPU batch; 128 on 8 GPUs (mixup.group_size).
Expected: frozen-backbone ADE20K mIoU 25.58 (Swin-T) -> 26.52 (LocAt Swin-T), the paper's numbers as
issue #15 quotes them (features: the last stage, stride 32). The spec gives no Swin top-1; the original
Swin-T reaches 81.3% with its own 300-epoch recipe (Liu et al. 2021), LocAt should keep it.
"""

import ml_collections

from locatvit_jax.configs import common


def swin_config(size: str, variant: str | None) -> ml_collections.ConfigDict:
  """The classification recipe for the Swin of `size` ('tiny', 'base', models.swin.SIZES) with a variant
  of swin.VARIANTS (default 'locat'). Mean/std come from the family (common.classification_config)."""
  return common.classification_config(f'locatswin_{size}', variant or 'locat')


def get_config(arg=None):
  return swin_config('tiny', arg)
