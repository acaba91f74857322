"""DINO pretraining (train/dino.py): its pieces against NumPy statements of facebookresearch/dino's code,
and the trainer end to end: sharded == one device, resume == uninterrupted, the export loads."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf, log_softmax, softmax

import locatvit_jax
from locatvit_jax import loading, metrics, sharding
from locatvit_jax import main as entry
from locatvit_jax.configs import dino_s
from locatvit_jax.models import dino_head, vit
from locatvit_jax.train import dino



# -- NumPy statements of DINO's code (main_dino.py DINOLoss, utils.py) -----------------------------
def np_dino_loss(student_out, teacher_out, center, temp, student_temp, ncrops):
  """DINOLoss.forward on crop-major rows (crop 0 of every image, then crop 1, ...)."""
  student = np.split(student_out / student_temp, ncrops)
  teacher = np.split(softmax((teacher_out - center) / temp, axis=-1), 2)
  total, terms = 0.0, 0
  for iq, q in enumerate(teacher):
    for v in range(ncrops):
      if v == iq:
        continue
      total += np.mean(np.sum(-q * log_softmax(student[v], axis=-1), axis=-1))
      terms += 1
  return total / terms


def np_update_center(center, teacher_out, momentum):
  return center * momentum + teacher_out.sum(0, keepdims=True) / len(teacher_out) * (1 - momentum)


def np_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
  warmup = np.linspace(start_warmup_value, base, warmup_epochs * niter_per_ep) if warmup_epochs else np.array([])
  iters = np.arange(epochs * niter_per_ep - len(warmup))
  return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def np_torch_bicubic(img, out_h, out_w, scale_h, scale_w, a=-0.75):
  """torch.nn.functional.interpolate(mode='bicubic', align_corners=False, scale_factor) on (H, W, C),
  pixel by pixel with its 16 taps."""
  h, w = img.shape[:2]

  def cubic(x):
    x = abs(x)
    if x <= 1:
      return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
      return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0

  out = np.zeros((out_h, out_w, img.shape[2]))
  for i in range(out_h):
    sy = (i + 0.5) / scale_h - 0.5
    for j in range(out_w):
      sx = (j + 0.5) / scale_w - 0.5
      y0, x0 = math.floor(sy), math.floor(sx)
      for yy in range(y0 - 1, y0 + 3):
        for xx in range(x0 - 1, x0 + 3):
          out[i, j] += cubic(sy - yy) * cubic(sx - xx) * img[min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)]
  return out


# -- the pieces ------------------------------------------------------------------------------------
def test_loss_and_center_match_dinos():
  rng = np.random.default_rng(0)
  b, v, k = 3, 5, 11  # 2 global + 3 local views
  student = rng.normal(size=(b, v, k)).astype(np.float32)
  teacher = rng.normal(size=(b, 2, k)).astype(np.float32)
  center = rng.normal(size=(1, k)).astype(np.float32) * 0.1
  crop_major = lambda x: x.transpose(1, 0, 2).reshape(-1, k)  # DINO concatenates crop by crop
  got = dino.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), 0.04, 0.1)
  want = np_dino_loss(crop_major(student), crop_major(teacher), center, 0.04, 0.1, v)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  got_center = dino.update_center(jnp.asarray(center), jnp.asarray(teacher), 0.9)
  np.testing.assert_allclose(np.asarray(got_center), np_update_center(center, crop_major(teacher), 0.9), rtol=1e-5,
                             atol=1e-7)
  # No gradient reaches the teacher's outputs through the targets.
  grad_teacher = jax.grad(lambda t: dino.dino_loss(jnp.asarray(student), t, jnp.asarray(center), 0.04, 0.1))(
      jnp.asarray(teacher))
  assert not np.any(np.asarray(grad_teacher))


def test_teacher_ema_and_schedules_match_dinos():
  rng = np.random.default_rng(0)
  teacher, student = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  got = dino.ema({'w': jnp.asarray(teacher, jnp.float32)}, {'w': jnp.asarray(student, jnp.float32)}, 0.996)
  np.testing.assert_allclose(np.asarray(got['w']), teacher * 0.996 + student * 0.004, rtol=1e-6, atol=1e-7)

  epochs, per_epoch = 7, 3
  config = dino_s.get_config('locat')
  config.batch_size, config.optim.warmup_epochs, config.epochs, config.steps_per_epoch = 512, 2, epochs, per_epoch
  config.dino.update(dict(warmup_teacher_temp=0.02, teacher_temp=0.07, warmup_teacher_temp_epochs=3))
  steps = dino.Steps.of(config, 10**6)
  assert (steps.total, steps.warmup, steps.frozen) == (21, 6, 3)
  sched = dino.Schedules.of(config, steps)
  t = jnp.arange(steps.total)
  np.testing.assert_allclose(np.asarray(sched.lr(t)), np_cosine_scheduler(5e-4 * 512 / 256, 1e-6, epochs, per_epoch, 2),
                             rtol=1e-5, atol=1e-10)
  np.testing.assert_allclose(np.asarray(sched.weight_decay(t)), np_cosine_scheduler(0.04, 0.4, epochs, per_epoch),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sched.momentum(t)), np_cosine_scheduler(0.996, 1.0, epochs, per_epoch),
                             rtol=1e-6)
  temps = np.concatenate((np.linspace(0.02, 0.07, 3), np.ones(epochs - 3) * 0.07))  # DINOLoss's schedule
  np.testing.assert_allclose(np.asarray(sched.teacher_temp(jnp.arange(epochs))), temps, rtol=1e-6)


def test_clipping_is_per_tensor_and_adamw_skips_the_frozen_layer_as_pytorch():
  rng = np.random.default_rng(0)
  grads = {'a': rng.normal(size=(5, 4)) * 3, 'b': rng.normal(size=(4,)) * 0.1}
  clipped = dino.clip_per_tensor(jax.tree.map(jnp.asarray, grads), 3.0)
  for name, g in grads.items():
    norm = np.linalg.norm(g)
    np.testing.assert_allclose(np.asarray(clipped[name]), g * min(3.0 / (norm + 1e-6), 1.0), rtol=1e-5)

  # torch.optim.AdamW, restated; 'last' has no gradient for the first 2 steps (cancel_gradients_last_layer).
  params = {'w': rng.normal(size=(3, 2)), 'last': rng.normal(size=(2, 2)), 'bias': rng.normal(size=(2,))}
  decay = {'w': True, 'last': True, 'bias': False}
  lr, wd, b1, b2, eps = 0.1, 0.04, 0.9, 0.999, 1e-8
  ref = {k: dict(p=v.copy(), m=np.zeros_like(v), v=np.zeros_like(v), t=0) for k, v in params.items()}
  got_p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = dino.adamw_init(got_p)
  for step in range(4):
    g = {k: rng.normal(size=v.shape) for k, v in params.items()}
    for k, r in ref.items():
      if k == 'last' and step < 2:
        continue
      r['t'] += 1
      r['p'] = r['p'] * (1 - lr * wd * decay[k])
      r['m'] = b1 * r['m'] + (1 - b1) * g[k]
      r['v'] = b2 * r['v'] + (1 - b2) * g[k] ** 2
      denom = np.sqrt(r['v']) / np.sqrt(1 - b2 ** r['t']) + eps
      r['p'] = r['p'] - lr / (1 - b1 ** r['t']) * r['m'] / denom
    active = {'w': True, 'bias': True, 'last': step >= 2}
    got_p, state = dino.adamw_update(got_p, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, lr=lr,
                                     weight_decay=wd, decay=decay, active=active, b1=b1, b2=b2, eps=eps)
  for k, r in ref.items():
    np.testing.assert_allclose(np.asarray(got_p[k]), r['p'], rtol=1e-5, atol=1e-5, err_msg=k)  # float32
  assert int(state['count']['last']) == 2 and int(state['count']['w']) == 4


def test_decay_mask_is_dinos_param_groups():
  model = nnx.eval_shape(lambda: tiny_model())
  flat = loading.flatten(nnx.to_pure_dict(dino.decay_mask(nnx.state(model, nnx.Param))))
  decayed = {k for k, v in flat.items() if v}
  assert {'backbone/pos_embed', 'backbone/cls_token', 'dino_head/last_layer', 'dino_head/mlp/0/kernel',
          'backbone/blocks/0/attn/gaug/var_proj/kernel'} <= decayed
  assert not decayed & {'backbone/norm/scale', 'dino_head/mlp/0/bias', 'backbone/blocks/0/attn/qkv/bias'}


def test_position_embedding_is_interpolated_as_dinos_vit():
  rng = np.random.default_rng(0)
  c, grid0, grid = 5, (14, 14), (6, 6)
  pos = rng.normal(size=(1, 1 + 14 * 14, c)).astype(np.float32)
  got = np.asarray(dino_head.dino_resample_pos_embed(jnp.asarray(pos), 1, grid0, grid))
  # DINO: interpolate(scale_factor=(6 + 0.1) / 14), so the output grid is floor(14 * 6.1 / 14) = 6.
  want = np_torch_bicubic(pos[0, 1:].reshape(14, 14, c), 6, 6, 6.1 / 14, 6.1 / 14)
  np.testing.assert_allclose(got[0, 1:].reshape(6, 6, c), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[0, 0], pos[0, 0])
  # timm's antialiased resize (vit.resample_pos_embed) gives another embedding: why DinoViT exists.
  timm = np.asarray(vit.resample_pos_embed(jnp.asarray(pos), 1, grid0, grid))
  assert np.abs(timm - got).max() > 0.1


@pytest.mark.parametrize('use_bn, norm_last_layer', [(False, True), (True, True), (False, False)],
                         ids=['plain', 'use_bn_in_head', 'trained_gain'])
def test_head_is_dinos_weight_normalised_mlp(use_bn, norm_last_layer):
  rng = np.random.default_rng(0)
  head = dino_head.DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4, use_bn=use_bn, norm_last_layer=norm_last_layer,
                            rngs=nnx.Rngs(1))
  if not norm_last_layer:  # weight_g starts at 1 (DINO fills it); a trained one scales each output
    np.testing.assert_array_equal(np.asarray(head.last_layer_gain[...]), np.ones((1, 10), np.float32))
    head.last_layer_gain[...] = jnp.asarray(rng.uniform(0.5, 2, (1, 10)), jnp.float32)
  if use_bn:  # non-trivial affine parameters
    for norm in head.norms:
      norm.scale[...] = jnp.asarray(rng.uniform(0.5, 2, 8), jnp.float32)
      norm.bias[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
  x = rng.normal(size=(2, 3, 6)).astype(np.float32)  # (images, crops, features)
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(head, nnx.Param)))
  gelu = lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2)))

  def batch_norm(z, i):  # BatchNorm1d in training mode over all 6 rows, biased variance, eps 1e-5
    if not use_bn:
      return z
    rows = z.reshape(-1, z.shape[-1])
    norm = p['norms'][i]
    return (z - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5) * norm['scale'] + norm['bias']

  h = gelu(batch_norm(x @ p['mlp'][0]['kernel'] + p['mlp'][0]['bias'], 0))
  h = gelu(batch_norm(h @ p['mlp'][1]['kernel'] + p['mlp'][1]['bias'], 1))
  h = h @ p['mlp'][2]['kernel'] + p['mlp'][2]['bias']
  h = h / np.linalg.norm(h, axis=-1, keepdims=True)
  w = p['last_layer'] / np.linalg.norm(p['last_layer'], axis=0, keepdims=True)  # weight_v / |weight_v| ...
  w = w * p.get('last_layer_gain', 1.0)  # ... * weight_g, fixed at 1 with norm_last_layer
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(x))), h @ w, rtol=1e-5, atol=1e-5)
  assert np.abs(p['last_layer']).max() <= 0.5  # PyTorch's Linear default U(+-1/sqrt(4))
  assert ('norms' in p) == use_bn and ('last_layer_gain' in p) == (not norm_last_layer)


def test_head_batch_norm_takes_the_global_batch_statistics_on_a_mesh():
  """DINO converts its heads' BatchNorm to SyncBatchNorm: statistics over every device's crops."""
  rng = np.random.default_rng(0)
  head = dino_head.DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4, use_bn=True, rngs=nnx.Rngs(1))
  x = rng.normal(size=(8, 2, 6)).astype(np.float32)
  whole = np.asarray(head(jnp.asarray(x)))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1)))
  graphdef, state = nnx.split(head)
  sharded = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jax.device_put(x, sharding.batch_sharding(mesh)))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), whole, rtol=1e-5, atol=1e-6)
  # One device's statistics (its own 2 images) would give other outputs.
  assert np.abs(np.asarray(head(jnp.asarray(x[:2]))) - whole[:2]).max() > 1e-2


def test_every_parameter_and_the_center_have_a_sharding_rule():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  config = tiny_config()
  config.dino.update(dict(out_dim=64, use_bn_in_head=True, norm_last_layer=False))
  setup = dino.build(config, dino.backbone_config(config), mesh, dino.Steps(4, 2, 1, 2))
  flat = loading.flatten(nnx.to_pure_dict(setup.abstract_state['params']))
  unmatched = [p for p in flat if sharding.rule_for(p)[0] == sharding.UNMATCHED]
  assert not unmatched, f'no sharding rule for {unmatched}'
  sh = setup.shardings
  P = jax.sharding.PartitionSpec
  for tree in ('params', 'teacher'):
    assert sh[tree]['dino_head']['last_layer'].get_value().spec == P('fsdp', 'tensor')
  assert sh['opt_state']['mu']['dino_head']['last_layer'].get_value().spec == P('fsdp', 'tensor')
  assert sh['params']['dino_head']['last_layer_gain'].get_value().spec == P(None, 'tensor')
  assert sh['center'].spec == P(None, 'tensor')
  # DINO freezes (and decays: 2-D) the gain with the direction: every parameter named '*last_layer*'.
  params = setup.abstract_state['params']
  frozen = loading.flatten(nnx.to_pure_dict(dino.is_last_layer(params)))
  assert {k for k, v in frozen.items() if v} == {'dino_head/last_layer', 'dino_head/last_layer_gain'}
  assert loading.flatten(nnx.to_pure_dict(dino.decay_mask(params)))['dino_head/last_layer_gain']


# -- the trainer end to end --------------------------------------------------------------------------
def tiny_model():
  cfg = vit.model_config('locatvit_ti16', num_classes=0, img_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                         mlp_dim=64)
  return dino_head.DINO(cfg, 16, hidden_dim=8, bottleneck_dim=4, rngs=nnx.Rngs(0))


def tiny_config(data_root=None, **overrides):
  """configs/dino_s.py shrunk to seconds: width 32, depth 2, patch 8, 32 px global and 16 px local crops."""
  c = dino_s.get_config('locat')
  c.model.update(dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64))
  c.crops.update(dict(global_size=32, local_size=16, num_local=2))
  c.dino.update(dict(out_dim=128, hidden_dim=32, bottleneck_dim=16))
  if data_root:
    c.data.update(dict(kind='folder', root=str(data_root)))
  c.input.worker_count = 0
  c.batch_size = 8
  c.steps_per_epoch = 2  # the last layer trains from step 3 on
  c.total_steps = 4
  c.optim.update(dict(warmup_epochs=1, lr_base_batch=8))
  c.log_every, c.checkpoint_every = 1, 2
  c.evals = ml_collections.ConfigDict()
  c.update(overrides)
  return c


def losses(workdir):
  return {r['step']: r['loss'] for r in metrics.read_metrics(workdir)}


@pytest.fixture(scope='module')
def runs(tmp_path_factory, image_folder):
  """One device, and 8 devices (data 2 x fsdp 2 x tensor 2) with k-NN on the teacher at the end."""
  root = tmp_path_factory.mktemp('dino')
  config = tiny_config(image_folder)
  dino.train_and_evaluate(config, str(root / 'single'), devices=jax.devices()[:1])
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  config.evals.knn = ml_collections.ConfigDict(dict(
      type='knn', every=0, ks=(3,), batch_size=8,
      data=dict(kind='folder', root=str(image_folder), img_size=32, eval_resize=36, worker_count=0)))
  result = entry.run(config, str(root / 'sharded'))
  return root, result


def test_sharded_training_matches_one_device(runs):
  root, _ = runs
  a, b = losses(root / 'single'), losses(root / 'sharded')
  assert a.keys() == b.keys() == {1, 2, 3, 4}
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5, atol=1e-5)
  pa = loading.flatten(locatvit_jax.get_params(locatvit_jax.load(root / 'single' / 'export')))
  pb = loading.flatten(locatvit_jax.get_params(locatvit_jax.load(root / 'sharded' / 'export')))
  for k in pa:
    np.testing.assert_allclose(pb[k], pa[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_the_last_layer_is_frozen_for_the_first_epoch_and_the_teacher_follows(runs):
  root, _ = runs
  from locatvit_jax import checkpoint
  ckpt = checkpoint.TrainCheckpointer(root / 'single', save_every=2)
  at2, at4 = (jax.tree.map(np.asarray, ckpt.read_state(s)) for s in (2, 4))
  ckpt.close()
  unwrap = lambda t: loading.flatten(checkpoint._unwrap_variables(t))
  s2, s4, t2, t4 = unwrap(at2['params']), unwrap(at4['params']), unwrap(at2['teacher']), unwrap(at4['teacher'])
  init = unwrap(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(
      dino.new_model(tiny_config(), dino.backbone_config(tiny_config()), 0), nnx.Param))))
  last = 'dino_head/last_layer'
  np.testing.assert_array_equal(s2[last], init[last])  # steps 1-2: epoch 0, frozen
  assert not np.allclose(s4[last], s2[last])  # trained from step 3
  assert int(np.asarray(unwrap(at2['opt_state']['count'])[last])) == 0
  assert not np.allclose(s2['backbone/blocks/0/attn/qkv/kernel'], init['backbone/blocks/0/attn/qkv/kernel'])
  assert np.any(at4['center'] != 0)
  # The teacher moved towards the student, slowly.
  k = 'backbone/blocks/0/mlp/fc1/kernel'
  assert 0 < np.abs(t4[k] - init[k]).max() < np.abs(s4[k] - init[k]).max()


def test_export_is_the_teacher_backbone_and_loads(runs):
  root, result = runs
  from locatvit_jax import checkpoint
  model = locatvit_jax.load(root / 'sharded' / 'export')
  assert isinstance(model, vit.ViT) and model.cfg.num_classes == 0 and model.cfg.img_size == (32, 32)
  ckpt = checkpoint.TrainCheckpointer(root / 'sharded', save_every=2)
  teacher = loading.flatten(checkpoint._unwrap_variables(jax.tree.map(np.asarray, ckpt.read_state(4)['teacher'])))
  ckpt.close()
  exported = loading.flatten(locatvit_jax.get_params(model))
  assert exported.keys() == {k.removeprefix('backbone/') for k in teacher if k.startswith('backbone/')}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, teacher[f'backbone/{k}'], err_msg=k)
  # k-NN on the teacher's backbone at the end (4 classes: chance 0.25).
  assert 0.0 <= result['knn/top1_k3'] <= 1.0
  record = json.loads((root / 'sharded' / 'evals' / 'knn_step4.json').read_text())
  assert record['step'] == 4 and record['metrics']['memory_size'] == 24


def test_resume_equals_uninterrupted(runs, tmp_path):
  root, _ = runs
  workdir = tmp_path / 'resumed'
  shutil.copytree(root / 'single', workdir)
  shutil.rmtree(workdir / 'checkpoints' / '4')  # as if killed after the checkpoint of step 2
  shutil.rmtree(workdir / 'export')
  config = tiny_config(runs_image_folder(root))
  dino.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  ref, got = losses(root / 'single'), losses(workdir)
  np.testing.assert_allclose([got[s] for s in (3, 4)], [ref[s] for s in (3, 4)], rtol=1e-6)
  pa = loading.flatten(locatvit_jax.get_params(locatvit_jax.load(root / 'single' / 'export')))
  pb = loading.flatten(locatvit_jax.get_params(locatvit_jax.load(workdir / 'export')))
  for k in pa:
    np.testing.assert_allclose(pb[k], pa[k], rtol=1e-6, atol=1e-6, err_msg=k)


def runs_image_folder(root):
  return json.loads((root / 'single' / 'run_config.json').read_text())['data']['root']


@pytest.mark.parametrize('override, message', [
    (dict(batch_size=6), 'batch_size=6 is not divisible by the data-parallel size 4'),
    ({'crops.local_size': 12}, r'crops.local_size=12; expected a positive multiple of the patch size 8'),
    ({'dino.teacher_temp': 0.0}, r'dino.teacher_temp=0.0; expected a temperature > 0'),
    (dict(model_name='vit_tiny_rope_mixed'), "model_name='vit_tiny_rope_mixed' is a 'rope' model"),
])
def test_bad_configs_fail_before_any_work(tmp_path, override, message):
  config = tiny_config('/nonexistent')
  config.mesh.update(dict(data=4))
  for k, v in override.items():
    node, *path = k.split('.')
    if path:
      config[node][path[0]] = v
    else:
      config[k] = v
  with pytest.raises(ValueError, match=message):
    dino.train_and_evaluate(config, str(tmp_path / 'w'), devices=jax.devices()[:4])
  assert not (tmp_path / 'w').exists()
