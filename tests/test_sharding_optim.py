"""Mesh construction, sharding rules, weight-decay mask and the LR schedules."""

import math

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import locatvit_jax
from locatvit_jax import sharding
from locatvit_jax.configs import common
from locatvit_jax.models import registry
from locatvit_jax.train import classification, optim


def mesh_cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(data=-1, fsdp=1, tensor=1), **kw))


def test_mesh_fills_the_free_axis():
  mesh = sharding.make_mesh(mesh_cfg(fsdp=2, tensor=2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert sharding.batch_parallelism(mesh) == 4


@pytest.mark.parametrize('cfg, message', [
    (dict(data=3), 'needs 3 devices; 8 are available'),
    (dict(data=-1, fsdp=3), 'does not divide 8 devices'),
    (dict(data=-1, fsdp=-1), 'at most one axis may be -1'),
])
def test_mesh_errors(cfg, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(mesh_cfg(**cfg))


def test_param_rules_shard_fsdp_and_tensor_and_drop_what_does_not_divide():
  mesh = sharding.make_mesh(mesh_cfg(data=1, fsdp=4, tensor=2))
  model = nnx.eval_shape(lambda: locatvit_jax.create_model('locatvit_ti16', num_classes=10))
  shardings = sharding.tree_shardings(locatvit_jax.get_params(model), mesh)
  blk = shardings['blocks']['0']
  assert blk['attn']['qkv']['kernel'].spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert blk['mlp']['fc2']['kernel'].spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
  assert blk['attn']['gaug']['var_proj']['kernel'].spec == jax.sharding.PartitionSpec(None, None)
  assert blk['norm1']['scale'].spec == jax.sharding.PartitionSpec(None)
  # head (192, 10): 10 is not divisible by fsdp=4, so that axis is dropped instead of failing.
  assert shardings['head']['kernel'].spec == jax.sharding.PartitionSpec(None, None)
  assert shardings['pos_embed'].spec == jax.sharding.PartitionSpec(None, None, 'fsdp')


@pytest.mark.parametrize('name', locatvit_jax.MODEL_NAMES)
def test_every_parameter_of_every_family_has_a_sharding_rule(name):
  overrides = {'reg_tokens': 4} if registry.family_of_name(name).FAMILY == 'vit' else {}  # registers too
  model = nnx.eval_shape(lambda: locatvit_jax.create_model(name, num_classes=10, **overrides))
  paths = locatvit_jax.loading.flatten(locatvit_jax.get_params(model))
  unmatched = [p for p in paths if sharding.rule_for(p)[0] == sharding.UNMATCHED]
  assert not unmatched, f'no sharding rule for {unmatched}'


def test_decay_mask_is_timms_per_parameter():
  # timm 1.0.19: no decay for ndim <= 1, biases and no_weight_decay() = pos_embed, cls_token,
  # dist_token; register tokens and every other matrix are decayed.
  model = nnx.eval_shape(lambda: locatvit_jax.create_model('locatvit_ti16', num_classes=10, depth=1, reg_tokens=2))
  flat = locatvit_jax.loading.flatten(optim.decay_mask(locatvit_jax.get_params(model)))
  decayed = {'patch_embed/kernel', 'reg_token', 'blocks/0/attn/qkv/kernel', 'blocks/0/attn/proj/kernel',
             'blocks/0/attn/gaug/var_proj/kernel', 'blocks/0/attn/gaug/alpha_proj/kernel',
             'blocks/0/mlp/fc1/kernel', 'blocks/0/mlp/fc2/kernel', 'head/kernel'}
  assert {'cls_token', 'pos_embed', 'patch_embed/bias', 'norm/scale', 'blocks/0/norm1/bias'} <= set(flat)
  assert flat == {k: k in decayed for k in flat}


def test_classification_schedule_is_the_authors_one_cycle():
  # The authors' OneCycleScheduler per update with their --warmup-lr 1e-7 and --min-lr 1e-7 defaults.
  config = common.classification_config('vit_ti16', 'locat')
  peak, total, warmup, start, end = 1e-3, 10, 3, 1e-7, 1e-7
  sched = classification.lr_schedule(config, total, warmup)
  for t in range(total + 3):
    if t < warmup:
      expected = start + t * (peak - start) / warmup
    elif t < total:
      expected = peak - (t - warmup) * (peak - end) / (total - warmup)
    else:
      expected = end
    np.testing.assert_allclose(float(sched(t)), expected, rtol=1e-5, err_msg=f'step {t}')  # float32


def mmcv_one_cycle_linear(t, max_lr, total, pct_start, div_factor, final_div_factor):
  """mmcv 1.7's OneCycleLrUpdaterHook (linear, two phases) at iteration t, restated: phase ends at
  iterations pct_start * total - 1 and total - 1, rates as multiples of max_lr / div_factor."""
  base = max_lr / div_factor
  phases = [(pct_start * total - 1, base, max_lr), (total - 1, max_lr, base / final_div_factor)]
  begin = 0
  for end_iter, lr0, lr1 in phases:
    if t <= end_iter:
      return lr0 + (lr1 - lr0) * (t - begin) / (end_iter - begin)
    begin = end_iter
  raise AssertionError(f'iteration {t} is past the schedule')


@pytest.mark.parametrize('total, pct_start', [(20, 0.25), (10, 0.25), (8, 0.5)])
def test_segmentation_schedule_is_mmcv_one_cycle_step_by_step(total, pct_start):
  # The segmentation config's numbers: lr 1e-3, start lr / 1e4 (div_factor), end start / 1e4.
  config = common.segmentation_config('ade20k', 'ti')
  lr = config.optim.lr
  sched = optim.one_cycle_linear(lr, total, pct_start, lr * config.optim.warmup_init_factor,
                                 lr * config.optim.end_factor)
  got = np.array([float(sched(t)) for t in range(total)])
  expected = [mmcv_one_cycle_linear(t, lr, total, pct_start, 1e4, 1e4) for t in range(total)]
  np.testing.assert_allclose(got, expected, rtol=2e-6)
  assert got.argmax() == math.ceil(pct_start * total - 1)
  with pytest.raises(ValueError, match='pct_start=1.5, total_steps=4'):
    optim.one_cycle_linear(lr, 4, 1.5, 0.0, 0.0)


def test_warmup_then_linear_decay():
  sched = optim.warmup_linear_decay(1e-3, total_steps=100, warmup_steps=20, init_value=0.0, end_value=0.0)
  lrs = np.array([sched(s) for s in range(101)])
  np.testing.assert_allclose(lrs[[0, 10, 20, 60, 100]], [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
  assert np.all(np.diff(lrs[:21]) > 0) and np.all(np.diff(lrs[20:]) < 0)
  with pytest.raises(ValueError, match='warmup_steps=30, total_steps=20'):
    optim.warmup_linear_decay(1e-3, total_steps=20, warmup_steps=30)


def test_rules_and_decay_mask_see_through_nnx_variables():
  """The trainers pass nnx.State (Variables add a trailing '.value' to each path), not plain dicts."""
  mesh = sharding.make_mesh(mesh_cfg(data=1, fsdp=4, tensor=2))
  model = nnx.eval_shape(lambda: locatvit_jax.create_model('locatvit_ti16', num_classes=10, depth=1))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  shardings = nnx.to_pure_dict(sharding.tree_shardings(params, mesh))
  assert shardings['blocks'][0]['attn']['qkv']['kernel'].spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  mask = locatvit_jax.loading.flatten(nnx.to_pure_dict(optim.decay_mask(params)))
  assert sorted(k for k, v in mask.items() if v) == sorted(
      k for k in mask if k.endswith('/kernel'))
  assert sum(mask.values()) == 8
