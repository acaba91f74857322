"""Frozen-backbone segmentation finetuning and evaluation (spec section 6), top to bottom.

Sections: config checks -> frozen backbone -> data -> head, optimizer, sharded state (resume or
init) -> jitted steps -> the loop -> whole-image evaluation (mIoU) and pictures -> the export.

The backbone comes from `locatvit_jax.load(config.init)`, so our exports, training workdirs and the
authors' checkpoints all work. Its params are an input of the jitted step, never of the optimizer,
and its features are computed under stop_gradient: training cannot change them. The step hands them
back, and the trainer evaluates, fingerprints and exports what the steps returned, so a step that
moved the backbone would show in the export.

The export, WORKDIR/export, has the layout of `checkpoint.save_params`: params/ holds
{'backbone': ..., 'head': ...} (plain nested dicts of arrays) and model_config.json the run's
`head_config` (the backbone's model record among them); `load_export` reads it back. Any model family
serves as backbone: the head reads `features()`, whose stride is the config's patch_size.
"""

from __future__ import annotations

import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx

from locatvit_jax import checkpoint, loading, paths, sharding, viz
from locatvit_jax.data import seg_pipeline, seg_sources
from locatvit_jax.evaluators import segmentation as seg_eval
from locatvit_jax.models import registry, seg_head, vit
from locatvit_jax.train import common, optim


# -- config ------------------------------------------------------------------------------------------
def check_config(config, mesh) -> None:
  common.check_loop_config(config)
  dp = sharding.batch_parallelism(mesh)
  problems = []
  if not config.init:
    problems.append('config.init is empty; expected a checkpoint path for the backbone (see README)')
  if config.batch_size % dp:
    problems.append(f'batch_size={config.batch_size} is not divisible by data-parallel size {dp}')
  if config.patch_size < 1 or config.crop_size % config.patch_size:
    problems.append(f'crop_size={config.crop_size} is not a multiple of patch_size={config.patch_size}')
  if config.eval_geometry not in seg_head.EVAL_GEOMETRIES:
    problems.append(f'eval_geometry={config.eval_geometry!r}; expected one of {seg_head.EVAL_GEOMETRIES}')
  if config.loss_average not in seg_head.LOSS_AVERAGES:
    problems.append(f'loss_average={config.loss_average!r}; expected one of {seg_head.LOSS_AVERAGES}')
  if problems:
    raise ValueError('; '.join(problems))


def check_backbone(config, bb_cfg) -> None:
  """The config's backbone expectations against what `config.init` holds."""
  # The size argument names a ViT width; other families' configs are checked by their feature stride.
  if config.get('size') and bb_cfg.FAMILY == vit.FAMILY and bb_cfg.width != vit.SIZES[config.size][0]:
    raise ValueError(f'config.init={config.init} holds a width-{bb_cfg.width} backbone; the config '
                     f'argument {config.size!r} expects width {vit.SIZES[config.size][0]}')
  if bb_cfg.feature_stride != config.patch_size:
    raise ValueError(f'patch_size={config.patch_size} but config.init={config.init} holds a backbone whose '
                     f'features have stride {bb_cfg.feature_stride}; set --config.patch_size={bb_cfg.feature_stride}')


def head_config(config, backbone_cfg) -> dict:
  """What the segmentation checkpoints record about the model (JSON)."""
  return {'init': str(config.init), 'backbone': json.loads(backbone_cfg.to_json()),
          'num_classes': config.data.num_classes, 'hidden': config.head_hidden}


def head_optimizer(schedule, optim_cfg) -> optax.GradientTransformation:
  """AdamW with weight decay on every head parameter, biases and GroupNorm included: mmcv's default
  optimizer constructor (one group, no paramwise_cfg), where the classifier follows timm's mask."""
  return optim.adamw(schedule, optim_cfg, mask=None)


# -- steps -----------------------------------------------------------------------------------------
def make_train_step(bb_graphdef, head_graphdef, tx, schedule, loss_average='all'):
  def loss_fn(head_params, feats, masks):
    head = nnx.merge(head_graphdef, head_params)
    logits = seg_head.upsample_logits(head(feats), masks.shape[1:3])
    return seg_head.segmentation_loss(logits, masks, average=loss_average)

  def train_step(state, bb_params, bb_rest, batch):
    backbone = nnx.merge(bb_graphdef, bb_params, bb_rest)
    feats = jax.lax.stop_gradient(backbone.features(batch['image']))
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], feats, batch['mask'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'step': state['step'] + 1, 'params': jax.tree.map(jnp.add, state['params'], updates),
                 'opt_state': opt_state}
    # The backbone leaves as it came (donated, so its buffers are reused, not copied): the trainer
    # keeps what the step returns.
    return new_state, bb_params, {'loss': loss, 'lr': schedule(state['step'])}

  return train_step


LABEL_BUCKET = 128  # label canvases are rounded up to this, bounding compilations per padded input


def make_predict(bb_graphdef, head_graphdef, geometry='reference'):
  """predict(head_params, bb_params, bb_rest, image, valid, label_size, canvas): the class map of one
  whole image (padded bottom/right to the patch multiple) at its original label size, the logits
  resized with `geometry` (seg_head.logits_at_label_size)."""
  return functools.partial(_predict, bb_graphdef, head_graphdef, geometry=geometry)


# Module-level, with the graph definitions static: compiled once per model, geometry, padded input
# shape and label canvas bucket in a process, however many runs or evaluations it makes.
@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=('canvas', 'geometry'))
def _predict(bb_graphdef, head_graphdef, head_params, bb_params, bb_rest, image, valid, label_size, canvas,
             geometry):
  backbone = nnx.merge(bb_graphdef, bb_params, bb_rest)
  head = nnx.merge(head_graphdef, head_params)
  logits = head(backbone.features(image[None]))[0]
  resized = seg_head.logits_at_label_size(logits, image.shape[:2], valid, label_size, canvas, geometry)
  return jnp.argmax(resized, -1).astype(jnp.int32)


def _on_first_local_device(tree):
  """A copy of the whole value of each array on this process's first device. With several processes
  (the arrays then span them all) one jitted identity replicates the whole tree first: gathering leaf
  by leaf would compile once per leaf."""
  if jax.process_count() > 1:
    replicated = jax.tree.map(lambda x: NamedSharding(x.sharding.mesh, P()), tree)
    tree = jax.tree.map(lambda x: x.addressable_data(0), jax.jit(_identity, out_shardings=replicated)(tree))
  return jax.device_put(tree, jax.local_devices()[0])


def _identity(tree):
  return tree


def evaluate(predict, head_params, bb_params, bb_rest, config, source, workdir=None, step=0) -> dict:
  """Whole-image inference at each image's own size: mIoU and the rest of segmentation_metrics from
  one confusion matrix over all hosts, and 'eval_skipped', the corrupt examples left out (all hosts).

  Every process runs its share of the images on its first device, from a copy of the params, with no
  collective before the sums at the end: processes may hold different numbers and sizes of images.
  """
  head_params, bb_params = _on_first_local_device((head_params, bb_params))
  bb_rest = jax.device_put(bb_rest, jax.local_devices()[0])  # the loaded backbone's, never on the mesh
  acc = seg_eval.ConfusionAccumulator(config.data.num_classes)
  panels, skipped = [], 0
  for ex in seg_pipeline.segmentation_eval_examples(
      source, scale=tuple(config.eval_scale), label_map=source.label_map, patch_size=config.patch_size):
    if ex['skipped']:  # a corrupt image or label, logged by the loader
      skipped += 1
      continue
    label = ex['label']
    canvas = tuple(-(-d // LABEL_BUCKET) * LABEL_BUCKET for d in label.shape[:2])
    pred = predict(head_params, bb_params, bb_rest, ex['image'], ex['valid_size'],
                   np.array(label.shape[:2], np.int32), canvas=canvas)
    pred = np.asarray(pred)[:label.shape[0], :label.shape[1]]
    acc.update(pred, label)
    if workdir and len(panels) < config.num_pictures:
      panels.append((ex['original_image'], label, pred))
  result = seg_eval.segmentation_metrics(acc.result())
  result['eval_skipped'] = int(np.sum(multihost_utils.process_allgather(np.int32(skipped))))
  if workdir and panels and jax.process_index() == 0:
    images, labels, preds = zip(*panels)
    viz.save_segmentation_panels(paths.path(workdir) / f'segmentation_step{step}.png',
                                 images, labels, preds, viz.seg_palette(config.data.num_classes))
  return result


# -- the run -----------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  mesh = sharding.make_mesh(config.mesh, devices)
  check_config(config, mesh)
  repl = sharding.replicated(mesh)
  workdir = paths.path(workdir)
  if config.eval_only and checkpoint.find_training_step(workdir) is None:
    raise ValueError(f'eval_only=True but {workdir} holds no trained head (no checkpoints); '
                     'train first, or point --workdir at a segmentation run')

  # Frozen backbone, in evaluation mode (no drop path), replicated on every device.
  backbone = common.load_model(config.init)
  bb_cfg = backbone.cfg
  check_backbone(config, bb_cfg)
  bb_graphdef, bb_params, bb_rest = nnx.split(backbone, nnx.Param, ...)
  bb_shardings = sharding.tree_shardings(bb_params, mesh)
  bb_params = jax.device_put(bb_params, bb_shardings)

  # Data, both splits opened now so that a missing one fails before the first step.
  train_source = seg_sources.segmentation_source(config.data, config.data.train_split)
  eval_source = seg_sources.segmentation_source(config.data, config.data.eval_split)
  train_iter = iter(seg_pipeline.segmentation_train_loader(
      train_source, global_batch_size=config.batch_size, crop_size=config.crop_size,
      scale=tuple(config.train_scale), ratio_range=tuple(config.ratio_range),
      label_map=train_source.label_map, seed=config.seed, worker_count=config.input.worker_count))

  # Head, optimizer, state.
  new_head = lambda: seg_head.SegHead(bb_cfg.feature_dim, config.data.num_classes, hidden=config.head_hidden,
                                      rngs=nnx.Rngs(config.seed))
  head_graphdef, abstract_params = nnx.split(nnx.eval_shape(new_head), nnx.Param)
  total = config.total_steps
  schedule = optim.one_cycle_linear(config.optim.lr, total, config.warmup_fraction,
                                    config.optim.lr * config.optim.warmup_init_factor,
                                    config.optim.lr * config.optim.end_factor)
  tx = head_optimizer(schedule, config.optim)
  abstract_state = common.abstract_train_state(abstract_params, tx)
  shardings = sharding.tree_shardings(abstract_state, mesh)
  init_fn = lambda: common.init_train_state(lambda: nnx.state(new_head(), nnx.Param), tx,
                                            abstract_state, shardings)
  ckpt = checkpoint.TrainCheckpointer(workdir, save_every=config.checkpoint_every,
                                      max_to_keep=config.keep_checkpoints)
  state, progress = common.restore_or_init(ckpt, train_iter, abstract_state, shardings, init_fn)
  start_step = common.host_int(state['step'])
  record = head_config(config, bb_cfg)

  batch_sh = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(bb_graphdef, head_graphdef, tx, schedule, config.loss_average),
                       in_shardings=(shardings, bb_shardings, repl, batch_sh),
                       out_shardings=(shardings, bb_shardings, None), donate_argnums=(0, 1))
  predict = make_predict(bb_graphdef, head_graphdef, config.eval_geometry)
  run_eval = lambda state, step: evaluate(predict, state['params'], bb_params, bb_rest, config, eval_source,
                                          workdir, step)

  if config.eval_only:
    result = run_eval(state, start_step)
    _log_result(result, start_step, workdir)
    return result

  last_eval = {}
  skipped = 0

  def step_fn(state):
    nonlocal bb_params, skipped
    local = next(train_iter)
    skipped += int(local.pop('skipped').sum())  # corrupt examples in this process's batches
    state, bb_params, scalars = train_step(state, bb_params, bb_rest, sharding.to_global(local, mesh))
    return state, scalars, {'data/skipped': skipped}

  def evaluate_fn(state, step):
    last_eval.update(run_eval(state, step))
    return {'miou': last_eval['miou'], 'pixel_acc': last_eval['pixel_acc']}

  state, _ = common.train_loop(state=state, start_step=start_step, total_steps=total, step_fn=step_fn,
                               evaluate_fn=evaluate_fn, data_iter=train_iter, ckpt=ckpt, record=record,
                               progress=progress, workdir=workdir, config=config)
  ckpt.close()
  if start_step >= total:
    logging.info('%s holds a finished run (step %d of %d): nothing to train.', workdir, start_step, total)
    result_file = workdir / common.eval_result_name(total)
    if result_file.exists():
      return json.loads(paths.read_text(result_file))
    last_eval.update(run_eval(state, total))  # the run stopped between its last checkpoint and this file
  backbone_params = loading.params_dict(bb_params)
  result = {**last_eval, 'backbone_sha256': params_sha256(backbone_params)}
  # Before the result file, which a rerun takes as the sign of a finished run.
  export = {'backbone': backbone_params, 'head': loading.params_dict(state['params'])}
  checkpoint.save_params(workdir / 'export', export, ml_collections.ConfigDict(record))
  _log_result(result, total, workdir)
  return result


def load_export(path) -> tuple[nnx.Module, seg_head.SegHead]:
  """The backbone and head of a segmentation export (WORKDIR/export), in evaluation mode:
  `head(backbone.features(images))` gives the logits at the patch grid."""
  params = checkpoint.restore_params(path)
  record, _ = checkpoint.read_model_record(path)
  backbone = loading.build_model(registry.config_from_dict(record['backbone']), params['backbone'])
  backbone.eval()
  # Shapes only: the params come from the file.
  head = nnx.eval_shape(lambda: seg_head.SegHead(backbone.cfg.feature_dim, record['num_classes'], hidden=record['hidden'],
                                                 rngs=nnx.Rngs(0)))
  head_params = nnx.state(head, nnx.Param)
  nnx.replace_by_pure_dict(head_params, jax.device_put(params['head']))
  nnx.update(head, head_params)
  return backbone, head


def params_sha256(params) -> str:
  """A fingerprint of parameter bytes in leaf order (of the export layout, loading.params_dict, to
  compare with checkpoint.restore_params): equal to the init checkpoint's, it proves the backbone
  never changed."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(multihost_utils.process_allgather(params, tiled=True)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _log_result(result: dict, step: int, workdir) -> None:
  if jax.process_index() == 0 and result:
    paths.write_text(paths.path(workdir) / common.eval_result_name(step),
                     json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}))
  logging.info('Step %d: mIoU %.4f, pixel accuracy %.4f.', step, result.get('miou', float('nan')),
               result.get('pixel_acc', float('nan')))
