"""Frozen-backbone segmentation finetuning and evaluation (spec section 6), top to bottom.

Sections: config checks -> frozen backbone -> data -> head, optimizer, sharded state (resume or
init) -> jitted steps -> the loop -> whole-image evaluation (mIoU) and pictures.

The backbone comes from `locatvit_jax.load(config.init)`, so our exports, training workdirs and the
authors' checkpoints all work. Its params are an input of the jitted step, never of the optimizer,
and its features are computed under stop_gradient: training cannot change them.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from flax import nnx

from locatvit_jax import checkpoint, paths, sharding, viz
from locatvit_jax.data import seg_pipeline, seg_sources
from locatvit_jax.evaluators import segmentation as seg_eval
from locatvit_jax.models import seg_head, vit
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
  if problems:
    raise ValueError('; '.join(problems))


def check_backbone(config, bb_cfg) -> None:
  """The config's backbone expectations against what `config.init` holds."""
  if config.get('size') and bb_cfg.width != vit.SIZES[config.size][0]:
    raise ValueError(f'config.init={config.init} holds a width-{bb_cfg.width} backbone; the config '
                     f'argument {config.size!r} expects width {vit.SIZES[config.size][0]}')
  if bb_cfg.patch_size != config.patch_size:
    raise ValueError(f'patch_size={config.patch_size} but config.init={config.init} holds a backbone with '
                     f'patch size {bb_cfg.patch_size}; set --config.patch_size={bb_cfg.patch_size}')


def head_config(config, backbone_cfg) -> dict:
  """What the segmentation checkpoints record about the model (JSON)."""
  return {'init': str(config.init), 'backbone': json.loads(backbone_cfg.to_json()),
          'num_classes': config.data.num_classes, 'hidden': config.head_hidden}


# -- steps -----------------------------------------------------------------------------------------
def make_train_step(bb_graphdef, head_graphdef, tx, schedule):
  def loss_fn(head_params, feats, masks):
    head = nnx.merge(head_graphdef, head_params)
    logits = seg_head.upsample_logits(head(feats), masks.shape[1:3])
    return seg_head.segmentation_loss(logits, masks)

  def train_step(state, bb_params, bb_rest, batch):
    backbone = nnx.merge(bb_graphdef, bb_params, bb_rest)
    feats = jax.lax.stop_gradient(backbone.features(batch['image']))
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], feats, batch['mask'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'step': state['step'] + 1, 'params': jax.tree.map(jnp.add, state['params'], updates),
                 'opt_state': opt_state}
    return new_state, {'loss': loss, 'lr': schedule(state['step'])}

  return train_step


LABEL_BUCKET = 128  # label canvases are rounded up to this, bounding compilations per padded input


def make_predict(bb_graphdef, head_graphdef):
  """Class map of one whole image at its original label size, compiled per size bucket.

  The image is padded bottom/right to the patch multiple; logits are upsampled to the padded
  input, the valid (h, w) region is resized bilinearly to the label size (H, W) with edge
  clamping as PyTorch's align_corners=False does, and argmax'd. (h, w, H, W) are traced, so
  one executable serves every image whose padded input and label canvas shapes agree.
  """
  def predict(head_params, bb_params, bb_rest, image, valid, label_size, canvas):
    backbone = nnx.merge(bb_graphdef, bb_params, bb_rest)
    head = nnx.merge(head_graphdef, head_params)
    logits = seg_head.upsample_logits(head(backbone.features(image[None])), image.shape[:2])[0]
    # Replicate the last valid row/column into the padding: bilinear taps past the edge then
    # read the edge value, which is PyTorch's clamping.
    rows = jnp.minimum(jnp.arange(logits.shape[0]), valid[0] - 1)
    cols = jnp.minimum(jnp.arange(logits.shape[1]), valid[1] - 1)
    logits = logits[rows][:, cols]
    scale = label_size.astype(jnp.float32) / valid.astype(jnp.float32)
    resized = jax.image.scale_and_translate(
        logits, (canvas[0], canvas[1], logits.shape[-1]), (0, 1), scale, jnp.zeros(2), 'linear',
        antialias=False)
    return jnp.argmax(resized, -1).astype(jnp.int32)
  return jax.jit(predict, static_argnames='canvas')


def evaluate(predict, head_params, bb_params, bb_rest, config, source, workdir=None, step=0) -> dict:
  """Whole-image inference at each image's own size; mIoU from a confusion matrix over all hosts."""
  acc = seg_eval.ConfusionAccumulator(config.data.num_classes)
  panels = []
  for ex in seg_pipeline.segmentation_eval_examples(
      source, scale=tuple(config.eval_scale), label_map=source.label_map, patch_size=config.patch_size):
    label = ex['label']
    canvas = tuple(-(-d // LABEL_BUCKET) * LABEL_BUCKET for d in label.shape[:2])
    pred = predict(head_params, bb_params, bb_rest, jnp.asarray(ex['image']),
                   jnp.asarray(ex['valid_size'], jnp.int32), jnp.asarray(label.shape[:2], jnp.int32),
                   canvas=canvas)
    pred = np.asarray(pred)[:label.shape[0], :label.shape[1]]
    acc.update(pred, label)
    if workdir and len(panels) < config.num_pictures:
      panels.append((ex['original_image'], label, pred))
  result = seg_eval.segmentation_metrics(acc.result())
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
  bb_params = jax.device_put(bb_params, sharding.tree_shardings(bb_params, mesh))

  # Data, both splits opened now so that a missing one fails before the first step.
  train_source = seg_sources.segmentation_source(config.data, config.data.train_split)
  eval_source = seg_sources.segmentation_source(config.data, config.data.eval_split)
  train_iter = iter(seg_pipeline.segmentation_train_loader(
      train_source, global_batch_size=config.batch_size, crop_size=config.crop_size,
      scale=tuple(config.train_scale), ratio_range=tuple(config.ratio_range),
      label_map=train_source.label_map, seed=config.seed, worker_count=config.input.worker_count))

  # Head, optimizer, state.
  new_head = lambda: seg_head.SegHead(bb_cfg.width, config.data.num_classes, hidden=config.head_hidden,
                                      rngs=nnx.Rngs(config.seed))
  head_graphdef, abstract_params = nnx.split(nnx.eval_shape(new_head), nnx.Param)
  total = config.total_steps
  schedule = optim.warmup_linear_decay(config.optim.lr, total, int(config.warmup_fraction * total),
                                       config.optim.lr * config.optim.warmup_init_factor,
                                       config.optim.lr * config.optim.end_factor)
  tx = optim.adamw(schedule, config.optim, abstract_params)
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
  train_step = jax.jit(make_train_step(bb_graphdef, head_graphdef, tx, schedule),
                       in_shardings=(shardings, None, repl, batch_sh), out_shardings=(shardings, None),
                       donate_argnums=0)
  predict = make_predict(bb_graphdef, head_graphdef)
  run_eval = lambda state, step: evaluate(predict, state['params'], bb_params, bb_rest, config, eval_source,
                                          workdir, step)

  if config.eval_only:
    result = run_eval(state, start_step)
    _log_result(result, start_step, workdir)
    return result

  last_eval = {}

  def step_fn(state):
    state, scalars = train_step(state, bb_params, bb_rest, sharding.to_global(next(train_iter), mesh))
    return state, scalars, {}

  def evaluate_fn(state, step):
    last_eval.update(run_eval(state, step))
    return {'miou': last_eval['miou'], 'pixel_acc': last_eval['pixel_acc']}

  common.train_loop(state=state, start_step=start_step, total_steps=total, step_fn=step_fn,
                    evaluate_fn=evaluate_fn, data_iter=train_iter, ckpt=ckpt, record=record,
                    progress=progress, workdir=workdir, config=config)
  ckpt.close()
  if start_step >= total:
    logging.info('%s holds a finished run (step %d of %d): nothing to train.', workdir, start_step, total)
    result_file = workdir / common.eval_result_name(total)
    if result_file.exists():
      return json.loads(paths.read_text(result_file))
    last_eval.update(run_eval(state, total))  # the run stopped between its last checkpoint and this file
  result = dict(last_eval)
  result['backbone_sha256'] = params_sha256(bb_params)
  _log_result(result, total, workdir)
  return result


def params_sha256(params) -> str:
  """A fingerprint of parameter bytes, in a fixed leaf order: proves the backbone never changed."""
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
