r"""LocAt RoPE-Mixed ViT-Ti/16 on ImageNet-1k, 300 epochs: the authors' recipe (spec sections 5 and 8).

RoPE-Mixed ViT (spec section 8): timm's Eva blocks with learnable 2-D rotary frequencies per block and
head instead of a position embedding, and layer scale; LocAt adds GAug (reading q before the rotation)
and PRR. The authors train it with the same train.py defaults as LocAtViT (their README and train.sh:
AdamW lr 5e-4 per 512 images, weight decay 0.05, clip 5, 20 warmup epochs then linear decay,
RandAugment, mixup/cutmix, label smoothing 0.1), drop path 0.1 (their rule for names with 'tiny'),
and, unlike the ViTs, ImageNet's mean and std (timm resolves them from the model's default_cfg;
models.rope.NORMALIZATION).

Command:
  python -m locatvit_jax.main --config=configs/rope_ti.py --workdir=gs://BUCKET/locatvit_ti_rope_mixed
  python -m locatvit_jax.main --config=configs/rope_ti.py:vit ...   # RoPE-Mixed baseline; also :gaug :prr
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: one v4-8 TPU VM or 8 GPUs (bf16: --config.model.dtype=bfloat16); global batch 1024.
Expected: the spec states no RoPE-Mixed numbers; its section 7 gives the plain ViT-Ti's (top-1
72.39 -> 73.94, frozen-backbone ADE20K mIoU 17.30 -> 23.47 with LocAt), the size of gain LocAt should
bring here.
"""

import ml_collections

from locatvit_jax.configs import common


def rope_config(size: str, variant: str | None) -> ml_collections.ConfigDict:
  """The classification recipe for the RoPE-Mixed ViT of `size` ('tiny', 'base', models.rope.SIZES) with
  a variant of rope.VARIANTS (default 'locat'); ImageNet's mean and std come with the family
  (rope.NORMALIZATION)."""
  return common.classification_config(f'vit_{size}_rope_mixed', variant or 'locat')


def get_config(arg=None):
  return rope_config('tiny', arg)
