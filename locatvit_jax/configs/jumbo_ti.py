r"""LocAt Jumbo-Ti/16 on ImageNet-1k, 300 epochs: the authors' recipe (spec sections 5 and 8).

Jumbo (spec section 8): 6 class tokens and one wide MLP shared by every block for them; LocAt adds GAug,
norm_patches and PRR. The authors train it with the same train.py defaults as LocAtViT (their README and
train.sh: AdamW lr 5e-4 per 512 images, weight decay 0.05, clip 5, 20 warmup epochs then linear decay,
RandAugment, mixup/cutmix, label smoothing 0.1; mean = std = 0.5), drop path 0.1 (their rule for a model
name containing 'tiny'). The head's bias starts at their 1/num_classes for 100, 1000 or 10450 classes and
at -log(num_classes) for any other count (their code refuses other counts).

Command:
  python -m locatvit_jax.main --config=configs/jumbo_ti.py --workdir=gs://BUCKET/locatjumbo_ti
  python -m locatvit_jax.main --config=configs/jumbo_ti.py:vit ...   # Jumbo baseline; also :gaug :prr
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: one v4-8 TPU VM or 8 GPUs (bf16: --config.model.dtype=bfloat16); global batch 1024.
Mixup groups: 256 images on v4-8, as the authors' per-GPU batch; 128 on 8 GPUs (mixup.group_size).
Expected: the spec states no Jumbo numbers; its section 7 gives the plain ViT-Ti's (top-1 72.39 -> 73.94,
frozen-backbone ADE20K mIoU 17.30 -> 23.47 with LocAt), the size of gain LocAt should bring here.
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.classification_config('jumbo_tiny', arg or 'locat')
