r"""Evaluate any checkpoint with k-NN, a linear probe and/or Hummingbird (task='evaluate'), no training.

Command (the argument picks evaluators from EVALUATORS, comma-separated; default knn,linear_probe):
  python -m locatvit_jax.main --config=configs/evaluate.py:knn,linear_probe --workdir=/tmp/eval_locat_ti \
      --config.init=CHECKPOINT --config.imagenet_root=/data/imagenet
  python -m locatvit_jax.main --config=configs/evaluate.py:hummingbird_voc --workdir=/tmp/hb \
      --config.init=CHECKPOINT --config.voc_root=/data       # the folder that holds VOCdevkit/
  python -m locatvit_jax.main --config=configs/evaluate.py:hummingbird_ade20k --workdir=/tmp/hb_ade \
      --config.init=CHECKPOINT --config.ade20k_root=/data    # the folder that holds ADEChallengeData2016/
CHECKPOINT: anything locatvit_jax.load reads: our export (WORKDIR/export) or training workdir, the
authors' .safetensors / .pth / Hugging Face folder (a bare state dict also needs --config.prr=true|false).
Data layouts:
  k-NN, linear probe: an ImageNet-style folder, imagenet_root/train/<class>/<image> (the memory / the
    probe's training set) and imagenet_root/val/<class>/<image> (queries / test), classes = sorted folder
    names; or TFDS with --config.evals.knn.data.kind=tfds --config.evals.knn.data.name=imagenet2012 (same
    for linear_probe). Images go through the evaluation transform of the paper's recipe: short side to
    eval_resize (bicubic), centre crop img_size, normalise with mean/std (DINO's own: 256/224 and the
    ImageNet mean/std, --config.eval_resize=256 --config.mean=... --config.std=...).
  Hummingbird: Pascal VOC 2012 as voc_root/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass[Aug],
    ImageSets/Segmentation} or ADE20K as ade20k_root/ADEChallengeData2016/{images,annotations}/...;
    see the README's Hummingbird section and locatvit_jax/data/seg_sources.py.
Hardware: one v4-8 TPU VM or 8 GPUs for ImageNet-1k (k-NN: 1.28 M x C memory sharded over the devices);
any CPU for small folders.
Writes WORKDIR/evals/{name}_step0.json, WORKDIR/metrics (metrics.jsonl rows) and TensorBoard events, and
prints `Final metrics: {...}`. Expected: the spec (section 7) lists no k-NN, linear-probe or
Hummingbird numbers, only linear-head mIoU and top-1; for scale, DINO's own ViT-S/16 reaches 74.5 k-NN
and 77.0 linear top-1 on ImageNet-1k (Caron et al. 2021, table 2).
"""

import ml_collections
from ml_collections import config_dict

from locatvit_jax.data import pipeline

EVALUATORS = ('knn', 'linear_probe', 'hummingbird_voc', 'hummingbird_ade20k')


def get_config(arg=None):
  names = tuple(n for n in (arg or 'knn,linear_probe').split(',') if n)
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown or not names:
    raise ValueError(f'config argument {arg!r}; expected evaluators among {EVALUATORS}, comma-separated')
  c = ml_collections.ConfigDict()
  c.task = 'evaluate'
  c.init = ''  # required: the checkpoint to evaluate
  # load()'s flags for what the files cannot tell (None: as the files say).
  c.prr = config_dict.placeholder(bool)
  c.ema = False
  c.trust_pickle = False
  c.dtype = config_dict.placeholder(str)  # e.g. 'bfloat16' for faster extraction
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Shared by the evaluators below (each evaluator's own field can still be set on its own).
  c.imagenet_root = config_dict.placeholder(str)
  c.voc_root = config_dict.placeholder(str)  # holds VOCdevkit/VOC2012 (seg_sources.voc_source)
  c.ade20k_root = config_dict.placeholder(str)  # holds ADEChallengeData2016 (seg_sources.ade20k_source)
  aug = pipeline.default_aug_config()
  c.img_size = 224
  c.eval_resize = aug.eval_resize
  c.mean = tuple(aug.mean)
  c.std = tuple(aug.std)
  c.worker_count = 8  # Grain worker processes per host

  def imagenet():
    return dict(kind='folder', root=c.get_ref('imagenet_root'), img_size=c.get_ref('img_size'),
                eval_resize=c.get_ref('eval_resize'), mean=c.get_ref('mean'), std=c.get_ref('std'),
                worker_count=c.get_ref('worker_count'))

  every = 0  # nothing is trained: each evaluator runs once
  table = {
      # DINO's eval_knn.py defaults.
      'knn': lambda: dict(type='knn', every=every, data=imagenet(), ks=(10, 20, 100, 200), temperature=0.07,
                          batch_size=256),
      # DINO's eval_linear.py optimiser on features extracted once (evaluators/linear_probe.py).
      'linear_probe': lambda: dict(type='linear_probe', every=every, data=imagenet(), epochs=100, lr=0.001,
                                   lr_base_batch=256, momentum=0.9, weight_decay=0.0, probe_batch_size=1024,
                                   batch_size=256),
      # The authors' open-hummingbird-eval settings (evaluators/hummingbird.py DEFAULTS).
      'hummingbird_voc': lambda: dict(type='hummingbird', every=every,
                                      data=dict(kind='voc', root=c.get_ref('voc_root'))),
      'hummingbird_ade20k': lambda: dict(type='hummingbird', every=every,
                                         data=dict(kind='ade20k', root=c.get_ref('ade20k_root'))),
  }
  c.evals = ml_collections.ConfigDict({n: table[n]() for n in names})
  return c
