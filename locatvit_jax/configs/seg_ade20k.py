r"""Frozen-backbone linear segmentation on ADE20K (150 classes) (spec section 6).

Command (backbone size as the argument, default b):
  python -m locatvit_jax.main --config=configs/seg_ade20k.py:b --config.init=/ckpts/locatvit_b16 \
      --config.data.root=/data/ade20k --workdir=/runs/seg_ade20k_b
Eval only: add --config.eval_only=True with a workdir that holds checkpoints.
Data layout under config.data.root: ADEChallengeData2016/{images,annotations}/{training,validation}/.
Hardware: 8 GPUs or one v4-8 TPU VM; batch 32, 20k iterations.
Expected mIoU (paper, single scale): ViT-Ti 17.3 -> LocAtViT-Ti 23.47; ViT-B 28.4 -> LocAtViT-B 32.64.
"""

from locatvit_jax.configs import common


def get_config(arg=None):
  return common.segmentation_config('ade20k', arg)
