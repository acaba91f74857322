"""Shared pieces of the configs: the paper's classification and segmentation recipes.

A classification config's argument is a model variant (`configs/vit_b.py:vit`, see each family's
VARIANTS, e.g. locatvit_jax.models.vit.VARIANTS): every variant is the same model code with switches. The GAP
variants (`:gap`, `:locat_gap`) are the authors' `--gp avg` runs: the class token stays, attending but
not pooled; `--config.model.class_token=False` removes it.
"""

import dataclasses

import ml_collections

from locatvit_jax.data import pipeline
from locatvit_jax.models import registry

def model_fields(model_name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """config.model: every field of `model_name`'s config (any family) with `variant`'s switches (None: the
  name's own), so that each is a --config.model.FIELD override. num_classes comes from config.data."""
  switches = registry.variant_overrides(model_name, variant) if variant else {}
  fields = dataclasses.asdict(registry.model_config(model_name, **switches))
  del fields['num_classes']
  # An int, as configs and command lines give it (ConfigDict keeps a field's type); a pair works too.
  fields['img_size'] = fields['img_size'][0] if fields['img_size'][0] == fields['img_size'][1] else fields['img_size']
  return ml_collections.ConfigDict(fields)


def classification_config(model_name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """The paper's ImageNet-1k recipe (spec section 5) for `model_name` (any family, e.g. 'vit_b16') with
  `variant`'s switches (e.g. 'locat'; None: the name's own)."""
  c = ml_collections.ConfigDict()
  c.task = 'classification'
  c.seed = 0
  c.init = ''  # optional: a checkpoint to start from (anything locatvit_jax.load reads)
  c.eval_only = False  # evaluate the workdir's newest checkpoint, else `init`; train nothing
  c.model_name = model_name
  c.model = model_fields(model_name, variant)

  c.data = ml_collections.ConfigDict(dict(
      kind='tfds', name='imagenet2012', data_dir=ml_collections.config_dict.placeholder(str),
      root=ml_collections.config_dict.placeholder(str), train_split='train',
      eval_split=ml_collections.config_dict.placeholder(str),  # None: 'validation' (TFDS), 'val' (folder)
      num_classes=1000))
  c.aug = pipeline.default_aug_config()
  # The family's normalisation (its timm default config's), as the authors trained and evaluated it.
  c.aug.mean, c.aug.std = registry.family_of_name(model_name).NORMALIZATION
  # Mixup/CutMix draw one lambda and one method per group_size images, each mixed with its group's
  # mirror image: timm mixes each GPU's batch on its own (the authors: 4 GPUs x 256). A group never
  # spans devices: with fewer images per device and micro-batch, those are the group.
  c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                                           label_smoothing=0.1, group_size=256))
  # Grain worker processes per host. A run resumes only with the worker_count it was saved with.
  c.input = ml_collections.ConfigDict(dict(worker_count=16))

  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.grad_accum = 1
  c.epochs = 300
  c.warmup_epochs = 20
  c.total_steps = 0  # > 0 overrides epochs
  c.warmup_steps = 0  # > 0 overrides warmup_epochs
  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4, lr_base_batch=512, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=5.0,
      warmup_init_lr=1e-7, end_lr=1e-7))  # the authors' --warmup-lr and --min-lr

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.log_every = 100
  c.eval_every = 5000
  # Evaluators by name, e.g. evals.knn = ConfigDict(type='knn', every=5000, data=...): run every
  # `every` steps (0: at the end only); see locatvit_jax/evaluators and configs/evaluate.py.
  c.evals = ml_collections.ConfigDict()
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.export_best = True
  c.profile_steps = ()  # (start, stop): a jax.profiler trace of those steps into WORKDIR/plugins/profile
  return c


def eval_transform(family: str = registry.DEFAULT_FAMILY) -> dict:
  """The recipe's evaluation transform for a model family, the same for every size: resize the short side
  to eval_resize (bicubic), centre-crop img_size, normalise with the family's mean and std (timm: crop_pct =
  img_size / eval_resize). Read by predict.preprocess and the Hugging Face config that convert writes."""
  aug = pipeline.default_aug_config()
  mean, std = registry.family(family).NORMALIZATION
  return dict(img_size=224, eval_resize=aug.eval_resize, mean=tuple(mean), std=tuple(std))


# Frozen-backbone segmentation (spec section 6): dataset -> (data fields, crop, train/eval scale).
SEG_DATASETS = {
    'ade20k': (dict(kind='ade20k', num_classes=150, train_split='training', eval_split='validation'),
               512, (2048, 512)),
    'pcontext': (dict(kind='pcontext', num_classes=59, train_split='train', eval_split='val'),
                 480, (520, 520)),
    'cocostuff': (dict(kind='cocostuff', num_classes=171, train_split='train2017', eval_split='val2017'),
                  512, (2048, 512)),
}


def segmentation_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  """Linear head on a frozen backbone; `arg` is the backbone size ('ti', 's', 'b', 'l'; default 'b')."""
  size = arg or 'b'
  if size not in ('ti', 's', 'b', 'l'):
    raise ValueError(f"config argument {size!r}; expected a backbone size: 'ti', 's', 'b' or 'l'")
  data, crop, scale = SEG_DATASETS[dataset]
  c = ml_collections.ConfigDict()
  c.task = 'segmentation'
  c.seed = 0
  c.size = size
  c.init = ''  # required: backbone checkpoint (our export or workdir, or the authors' weights)
  c.data = ml_collections.ConfigDict(dict(
      root=ml_collections.config_dict.placeholder(str), data_dir=ml_collections.config_dict.placeholder(str),
      **data))
  c.patch_size = 16
  c.crop_size = crop
  c.train_scale = scale
  c.eval_scale = scale
  c.ratio_range = (0.5, 2.0)
  c.head_hidden = 512
  # Each default is the authors' mmseg behaviour; the alternatives are ours (seg_head for both):
  # 'crop' keeps evaluation logits over the pixels they were computed for, 'labelled' averages the
  # loss over labelled pixels only.
  c.eval_geometry = 'reference'  # or 'crop'
  c.loss_average = 'all'  # or 'labelled'
  c.input = ml_collections.ConfigDict(dict(worker_count=8))
  c.batch_size = 32
  c.total_steps = 20_000
  c.warmup_fraction = 0.25
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=0.0,
      warmup_init_factor=1e-4, end_factor=1e-8))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.log_every = 50
  c.eval_every = 0  # 0: evaluate at the end only
  c.eval_only = False
  c.num_pictures = 4
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.profile_steps = ()  # (start, stop): a jax.profiler trace of those steps into WORKDIR/plugins/profile
  return c
