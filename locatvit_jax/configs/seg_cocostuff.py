r"""Frozen-backbone linear segmentation on COCO-Stuff-164k (171 classes) (spec section 6).

Command (backbone size as the argument, default b):
  python -m locatvit_jax.main --config=configs/seg_cocostuff.py:b --config.init=/ckpts/locatvit_b16 \
      --config.data.root=/data/cocostuff --workdir=/runs/seg_cocostuff_b
Eval only: add --config.eval_only=True with a workdir that holds checkpoints.
Data layout under config.data.root: {images,annotations}/{train2017,val2017}/ (mmseg labelTrainIds).
Hardware: 8 GPUs or one v4-8 TPU VM; batch 32, 20k iterations.
Expected mIoU (paper, single scale): ViT-Ti 20.29 -> LocAtViT-Ti 26.15; ViT-B 30.43 -> LocAtViT-B 33.62.
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.segmentation_config('cocostuff', arg)
