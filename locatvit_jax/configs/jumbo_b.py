r"""LocAt Jumbo-B/16 on ImageNet-1k, 300 epochs: the authors' recipe (spec sections 5 and 8), as
configs/jumbo_ti.py at base size (width 768, 12 heads; drop path 0.4, their rule for a name with 'base').

Command:
  python -m locatvit_jax.main --config=configs/jumbo_b.py --workdir=gs://BUCKET/locatjumbo_b
  python -m locatvit_jax.main --config=configs/jumbo_b.py:vit ...   # Jumbo baseline; also :gaug :prr
Data: as configs/jumbo_ti.py.
Hardware: a v4-32 TPU pod slice (4 hosts) or 4 nodes x 8 GPUs; global batch 1024.
Mixup groups: a device's 64 (v4-32) or 32 (GPUs) images; the authors' 4 GPUs mixed 256 (mixup.group_size).
Expected: the spec states no Jumbo numbers; its section 7 gives the plain ViT-B's (top-1 80.99 -> 82.31,
frozen-backbone ADE20K mIoU 28.40 -> 32.64 with LocAt), the size of gain LocAt should bring here.
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.classification_config('jumbo_base', arg or 'locat')
