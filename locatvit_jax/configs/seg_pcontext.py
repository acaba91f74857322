r"""Frozen-backbone linear segmentation on PASCAL-Context-59 (spec section 6).

Command (backbone size as the argument, default b):
  python -m locatvit_jax.main --config=configs/seg_pcontext.py:b --config.init=/ckpts/locatvit_b16 \
      --config.data.root=/data/pcontext --workdir=/runs/seg_pcontext_b
Eval only: add --config.eval_only=True with a workdir that holds checkpoints.
Data layout under config.data.root: VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,ImageSets/SegmentationContext}/.
Hardware: 8 GPUs or one v4-8 TPU VM; batch 32, 20k iterations.
Expected mIoU (paper, single scale): ViT-Ti 33.71 -> LocAtViT-Ti 38.57; ViT-B 43.1 -> LocAtViT-B 45.35.
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.segmentation_config('pcontext', arg)
