"""Optimizers and schedules for both trainers (spec sections 5 and 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from locatvit_jax import sharding
from locatvit_jax.models import registry


def decay_mask(params):
  """timm 1.0.19's weight-decay rule (param_groups_weight_decay with the model's no_weight_decay()):
  decay every parameter except those with ndim <= 1 (norms, layer scales), biases and what the
  model's no_weight_decay() names: each family's NO_WEIGHT_DECAY, paths or their last components
  (the ViT's pos_embed and cls_token, RoPE's rope/freqs, Swin's relative_position_bias_table).
  So register tokens are decayed, as timm 1.0.19 does, and GAug's kernels are."""
  # Every family's names: none is a parameter of another family.
  no_decay = {name for family in registry.families() for name in family.NO_WEIGHT_DECAY}

  def decayed(path, x):
    name = sharding.path_key(path)
    named = any(name == n or name.endswith('/' + n) for n in no_decay)
    return x.ndim > 1 and not name.endswith('/bias') and not named
  return jax.tree_util.tree_map_with_path(decayed, params)


def warmup_linear_decay(peak: float, total_steps: int, warmup_steps: int,
                        init_value: float = 0.0, end_value: float = 0.0) -> optax.Schedule:
  """Linear warmup init_value -> peak, then linear decay to end_value at total_steps (not cosine).

  Step t's rate is the authors' OneCycleScheduler at t (their train.py, --sched-on-updates):
  init + (peak - init) * t / warmup_steps, then peak - (peak - end) * (t - warmup_steps) /
  (total_steps - warmup_steps), and end_value from total_steps on.
  """
  if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
    raise ValueError(f'warmup_steps={warmup_steps}, total_steps={total_steps}; '
                     'expected 0 <= warmup_steps <= total_steps and total_steps > 0')
  return optax.join_schedules([
      optax.linear_schedule(init_value, peak, max(warmup_steps, 1)),
      optax.linear_schedule(peak, end_value, max(total_steps - warmup_steps, 1)),
  ], [warmup_steps])


def one_cycle_linear(peak: float, total_steps: int, pct_start: float, init_value: float,
                     end_value: float) -> optax.Schedule:
  """mmcv 1.x's OneCycleLrUpdaterHook(anneal_strategy='linear', three_phase=False), by iteration.

  mmcv ends its warmup phase at iteration pct_start * total_steps - 1 (a fraction if that is not
  whole), so the peak comes one iteration before warmup_linear_decay's, and the decay reaches
  end_value at the last iteration, total_steps - 1 (held there after).
  """
  peak_at, last = pct_start * total_steps - 1, total_steps - 1
  if not 0 <= pct_start <= 1 or total_steps < 1:
    raise ValueError(f'pct_start={pct_start}, total_steps={total_steps}; expected 0 <= pct_start <= 1 '
                     'and total_steps >= 1')
  # A phase of length 0 (where mmcv divides by zero) is never divided by: its iterations belong to
  # the other phase, except iteration 0 of an empty warmup, which starts at init_value.
  warm_span, decay_span = peak_at or 1.0, (last - peak_at) or 1.0

  def schedule(count):
    t = jnp.minimum(count, last).astype(jnp.float32)
    warm = init_value + (peak - init_value) * t / warm_span
    # Written from the end, so that float32 gives end_value itself at the last iteration.
    decay = end_value + (peak - end_value) * (last - t) / decay_span
    return jnp.where(t <= peak_at, warm, decay)

  return schedule


def adamw(schedule: optax.Schedule, optim_cfg, mask=None) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with decoupled weight decay on the params `mask` marks: timm's
  rule is decay_mask(params); None decays every parameter, as mmcv's default optimizer constructor
  (one group, no paramwise_cfg) does for the segmentation head."""
  chain = []
  if optim_cfg.get('grad_clip'):
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=mask))
  return optax.chain(*chain)
