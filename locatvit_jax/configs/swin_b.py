r"""LocAt Swin-B on ImageNet-1k, 300 epochs: the authors' recipe (spec sections 5 and 8).

As configs/swin_t.py (same recipe, ImageNet mean and std) at Swin-B size: width 128, depths 2-2-18-2,
heads 4-8-16-32, window 7, drop path 0.4 (the authors' rule for names with 'base'); their README trains
base models at batch 4 x 256, lr 1e-3, which is this recipe's 5e-4 per 512 images.

Command:
  python -m locatvit_jax.main --config=configs/swin_b.py --workdir=gs://BUCKET/locatswin_base
  python -m locatvit_jax.main --config=configs/swin_b.py:vit ...   # plain Swin-B baseline; also :gaug :prr
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: a v4-32 TPU pod slice (4 hosts) or 4 nodes x 8 GPUs; global batch 1024 (Swin-B is 15.4 GFLOPs
per image, about ViT-B's 17.6).
Mixup groups: a device's 64 (v4-32) or 32 (GPUs) images; the authors' 4 GPUs mixed 256 (mixup.group_size).
Expected: the spec and issue #15 give no Swin-B numbers; Swin-T's frozen-backbone ADE20K mIoU goes
25.58 -> 26.52 with LocAt (configs/swin_t.py). The original Swin-B reaches 83.5% top-1 with its own
300-epoch recipe (Liu et al. 2021).
"""

from locatvit_jax.configs import swin_t


def get_config(arg=None):
  return swin_t.swin_config('base', arg)
