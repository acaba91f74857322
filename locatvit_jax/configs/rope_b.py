r"""LocAt RoPE-Mixed ViT-B/16 on ImageNet-1k, 300 epochs: the authors' recipe (spec sections 5 and 8).

As configs/rope_ti.py (same recipe and ImageNet mean/std) at ViT-B size: width 768, 12 heads, drop path
0.4 (the authors' rule for names with 'base'); their README trains base models at batch 4 x 256, lr 1e-3,
which is this recipe's 5e-4 per 512 images.

Command:
  python -m locatvit_jax.main --config=configs/rope_b.py --workdir=gs://BUCKET/locatvit_b_rope_mixed
  python -m locatvit_jax.main --config=configs/rope_b.py:vit ...   # RoPE-Mixed baseline; also :gaug :prr
Data: ImageNet as TFDS ArrayRecord (`tfds build imagenet2012 --manual_dir=...`, see README), or any
image folder with --config.data.kind=folder --config.data.root=DIR (DIR/train/CLASS/*.jpg, DIR/val/...).
Hardware: a v4-32 TPU pod slice (4 hosts) or 4 nodes x 8 GPUs; global batch 1024.
Mixup groups: a device's 64 (v4-32) or 32 (GPUs) images; the authors' 4 GPUs mixed 256 (mixup.group_size).
Expected: the spec states no RoPE-Mixed numbers; its section 7 gives the plain ViT-B's (top-1
80.99 -> 82.31, frozen-backbone ADE20K mIoU 28.40 -> 32.64 with LocAt), the size of gain LocAt should
bring here.
"""

from locatvit_jax.configs import rope_ti


def get_config(arg=None):
  return rope_ti.rope_config('base', arg)
