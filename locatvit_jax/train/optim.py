"""Optimizers and schedules for both trainers (spec sections 5 and 6)."""

from __future__ import annotations

import jax
import optax

from locatvit_jax import sharding


def decay_mask(params):
  """Weight decay only on matmul/conv kernels: not on biases, norms, position embedding or tokens.

  This is timm's rule (no decay for ndim <= 1 and for pos_embed / cls_token / reg_token).
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: sharding.path_key(path).endswith('/kernel'), params)


def warmup_linear_decay(peak: float, total_steps: int, warmup_steps: int,
                        init_value: float = 0.0, end_value: float = 0.0) -> optax.Schedule:
  """Linear warmup init_value -> peak, then linear decay to end_value at total_steps (not cosine)."""
  if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
    raise ValueError(f'warmup_steps={warmup_steps}, total_steps={total_steps}; '
                     'expected 0 <= warmup_steps <= total_steps and total_steps > 0')
  return optax.join_schedules([
      optax.linear_schedule(init_value, peak, max(warmup_steps, 1)),
      optax.linear_schedule(peak, end_value, max(total_steps - warmup_steps, 1)),
  ], [warmup_steps])


def adamw(schedule: optax.Schedule, optim_cfg, params) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with decoupled, masked weight decay."""
  chain = []
  if optim_cfg.get('grad_clip'):
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask(params)))
  return optax.chain(*chain)
