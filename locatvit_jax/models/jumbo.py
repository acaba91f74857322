"""Jumbo and LocAt Jumbo (spec section 8; the authors' models/jumbo.py, after Fuller et al. 2025).

A ViT with J = 6 class tokens and no position embedding for them. Every block runs attention over all
tokens, then treats the two kinds of token apart: the patches go through the block's own MLP, the J
class tokens are concatenated into one (J * C) vector that goes through ONE wide MLP shared by all
blocks. The model holds that MLP once (`Jumbo.jumbo_mlp`) and hands it to every block, so the params,
the Orbax export and the gradient (the sum of every block's use) have it once. All three residual
branches have layer scale.

After the blocks the concatenated class vector is normed as one (J * C channels); LocAt norms the patches
with `norm_patches`, puts the J normed class tokens back in front of them and runs PRR over all J + hw
tokens (the backbone's heads); the head reads PRR's J class-token outputs side by side, (B, J * C). The
norms the authors take from torch (norm3, norm, norm_patches) have eps 1e-5; timm's (norm1, norm2) 1e-6.
Dense features are the last block's patch tokens, before any norm and PRR.

The baseline (`jumbo_*`) is the same code with gaug=False and prr=False. The authors' `locat` switch
turns on GAug, PRR and `norm_patches` together; here `norm_patches` exists exactly when PRR does, the
only thing that reads the normed patches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from locatvit_jax.models import init, locat, registry, vit

FAMILY = 'jumbo'

# size: (width, depth, heads, drop_path). The authors register tiny and base only; drop_path is their
# train.py's rule for names containing 'tiny' / 'base'.
SIZES = {
    'tiny': (192, 12, 3, 0.1),
    'base': (768, 12, 12, 0.4),
}
MODEL_NAMES = tuple(f'{kind}_{size}' for size in SIZES for kind in ('jumbo', 'locatjumbo'))
MODEL_ALIASES: dict[str, str] = {}  # our names are the authors'; timm has no Jumbo

VARIANTS = {
    'locat': dict(gaug=True, prr=True),  # LocAt Jumbo
    'vit': dict(gaug=False, prr=False),  # Jumbo baseline
    'gaug': dict(gaug=True, prr=False),  # ablation: GAug only
    'prr': dict(gaug=False, prr=True),  # ablation: PRR (and norm_patches) only
}

# The authors' default_cfgs are timm's ViT _cfg(): mean = std = 0.5, as the ViT's.
NORMALIZATION = vit.NORMALIZATION
# The authors' Jumbo keeps timm's VisionTransformer.no_weight_decay().
NO_WEIGHT_DECAY = vit.NO_WEIGHT_DECAY

# The authors set the head bias to "init at 1/num_classes" for the three class counts they train (and
# refuse others); -log(num_classes), which those constants round, for any other count.
HEAD_BIAS = {100: -4.6, 1000: -6.9, 10450: -9.25}


def head_bias(num_classes: int) -> float:
  return HEAD_BIAS.get(num_classes, -math.log(num_classes))


@dataclasses.dataclass(frozen=True)
class JumboConfig(vit.PatchTokens, registry.ModelConfig):
  """Everything that defines the architecture and how it computes. Serialised next to params."""

  FAMILY: ClassVar[str] = FAMILY

  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768  # the patches' per-block MLP
  patch_size: int = 16
  img_size: tuple[int, int] = (224, 224)  # the grid GAug constants and pos_embed are built for
  num_classes: int = 1000  # 0: no head, the model returns the pooled (J * C) vector
  num_class_tokens: int = 6  # the authors' J
  jumbo_mlp_ratio: float = 4.0  # hidden width of the shared MLP over its (J * C) input
  init_values: float = 1e-4  # layer scale's initial value (all three branches)
  gaug: bool = True
  prr: bool = True
  drop_path: float = 0.0  # the last block's rate; linear from 0 over depth
  dtype: str = 'float32'  # matmul dtype; params, norms, GAug and softmax stay float32
  gaug_impl: str = 'fused'
  remat: str = 'none'  # vit.REMAT_POLICIES

  def __post_init__(self):
    object.__setattr__(self, 'img_size', vit._pair(self.img_size))
    positive = {'width': self.width, 'depth': self.depth, 'num_heads': self.num_heads, 'mlp_dim': self.mlp_dim,
                'patch_size': self.patch_size, 'img_size': min(self.img_size),
                'num_class_tokens': self.num_class_tokens, 'jumbo_mlp_ratio': self.jumbo_mlp_ratio,
                'init_values': self.init_values}
    self.validate(positive, [
        (self.width % self.num_heads == 0, f'width={self.width} must be a multiple of num_heads={self.num_heads}'),
    ])

  @property
  def num_prefix(self) -> int:
    return self.num_class_tokens

  @property
  def jumbo_dim(self) -> int:
    """Width of the concatenated class tokens: the shared MLP's input, the final norm's and the head's."""
    return self.num_class_tokens * self.width

  @property
  def jumbo_hidden(self) -> int:
    return int(self.jumbo_dim * self.jumbo_mlp_ratio)  # int() as the authors truncate


def model_config(name: str, **overrides) -> JumboConfig:
  """`locatjumbo_tiny` -> JumboConfig of LocAt Jumbo-Ti/16 (GAug and PRR on); overrides win."""
  name = MODEL_ALIASES.get(name, name)
  if name not in MODEL_NAMES:
    raise ValueError(f'unknown model name {name!r}; expected one of {MODEL_NAMES}')
  kind, size = name.split('_')
  width, depth, heads, dpr = SIZES[size]
  locat_on = kind == 'locatjumbo'
  base = dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=16, drop_path=dpr,
              gaug=locat_on, prr=locat_on)
  base.update(overrides)
  return JumboConfig.from_dict(base)


class LayerScale(nnx.Module):
  """x * gamma, one learned factor per channel (timm's LayerScale)."""

  def __init__(self, dim: int, init_value: float):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x):
    return x * self.gamma[...]


class JumboBlock(nnx.Module):
  """Attention over all tokens; then the class tokens, as one vector, through the shared MLP (given by the
  caller) and the patches through this block's MLP. Pre-norm, layer scale and stochastic depth on all
  three branches."""

  def __init__(self, cfg: JumboConfig, drop_path: float, rngs: nnx.Rngs, drop_rngs: nnx.Rngs):
    c, dtype = cfg.width, vit.DTYPES[cfg.dtype]
    self.num_class_tokens = cfg.num_class_tokens
    # norm1/norm2 are timm's LayerNorm (eps 1e-6); the authors' norm3 is torch's nn.LayerNorm (eps 1e-5).
    self.norm1 = nnx.LayerNorm(c, epsilon=1e-6, rngs=rngs)
    self.attn = vit.Attention(cfg, rngs)
    self.ls1 = LayerScale(c, cfg.init_values)
    self.norm2 = nnx.LayerNorm(c, epsilon=1e-6, rngs=rngs)
    self.mlp = vit.Mlp(c, cfg.mlp_dim, dtype, rngs)
    self.ls2 = LayerScale(c, cfg.init_values)
    self.norm3 = nnx.LayerNorm(cfg.jumbo_dim, epsilon=1e-5, rngs=rngs)
    self.ls3 = LayerScale(cfg.jumbo_dim, cfg.init_values)
    # Dropout with the mask broadcast over all but the batch axis is timm's DropPath.
    self.drop_path1 = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=drop_rngs)
    self.drop_path2 = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=drop_rngs)
    self.drop_path3 = nnx.Dropout(drop_path, broadcast_dims=(1,), rngs=drop_rngs)

  def __call__(self, x, grid, jumbo_mlp: vit.Mlp):
    j = self.num_class_tokens
    b, _, c = x.shape
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid, j).astype(x.dtype)))
    cls = x[:, :j].reshape(b, j * c)  # token-major: the J tokens side by side
    cls = cls + self.drop_path3(self.ls3(jumbo_mlp(self.norm3(cls)).astype(x.dtype)))
    patches = x[:, j:]
    patches = patches + self.drop_path2(self.ls2(self.mlp(self.norm2(patches)).astype(x.dtype)))
    return jnp.concatenate([cls.reshape(b, j, c), patches], axis=1)


class Jumbo(vit.ViT):
  """Jumbo / LocAt Jumbo. `model(images)` -> logits; `model.features(images)` -> (B, h, w, C).

  Image checks, features() and the logits' head are the ViT's; tokens, blocks and pooling are Jumbo's.
  """

  def __init__(self, cfg: JumboConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, p, dtype = cfg.width, cfg.patch_size, vit.DTYPES[cfg.dtype]
    self.patch_embed = vit.PatchConv(c, p, dtype, rngs)
    # Jumbo re-initialises its class tokens with timm's trunc_normal_(std=.02), not the ViT's 1e-6.
    self.cls_token = nnx.Param(init.TRUNC_NORMAL(rngs.params(), (1, cfg.num_class_tokens, c)))
    self.pos_embed = nnx.Param(init.TRUNC_NORMAL(rngs.params(), (1, cfg.grid[0] * cfg.grid[1], c)))
    self.jumbo_mlp = vit.Mlp(cfg.jumbo_dim, cfg.jumbo_hidden, dtype, rngs)
    rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    drop_rngs = nnx.Rngs(dropout=rngs['dropout']())  # as vit.ViT: trainers reseed the 'dropout' stream
    self.blocks = nnx.List([JumboBlock(cfg, r, rngs, drop_rngs) for r in rates])
    self.norm = nnx.LayerNorm(cfg.jumbo_dim, epsilon=1e-5, rngs=rngs)
    self.norm_patches = nnx.LayerNorm(c, epsilon=1e-5, rngs=rngs) if cfg.prr else None
    # The authors zero the head's weight and start its bias at 1/num_classes (HEAD_BIAS).
    self.head = (nnx.Linear(cfg.jumbo_dim, cfg.num_classes, kernel_init=init.ZEROS,
                            bias_init=nnx.initializers.constant(head_bias(cfg.num_classes)), rngs=rngs)
                 if cfg.num_classes else None)

  def embed(self, images: jax.Array):
    """Patch tokens plus position embedding, with the class tokens (no position rows) in front: (B, N, C)."""
    grid = self.grid_of(images)
    x = self.patch_embed(images).astype(jnp.float32)
    b = x.shape[0]
    x = x.reshape(b, grid[0] * grid[1], -1)
    x = x + vit.resample_pos_embed(self.pos_embed[...], 0, self.cfg.grid, grid)
    cls = jnp.broadcast_to(self.cls_token[...], (b,) + self.cls_token.shape[1:])
    return jnp.concatenate([cls, x], axis=1), grid

  def encode(self, images: jax.Array, layers: Sequence[int] = ()):
    """Runs the blocks. Returns the last block's tokens, the grid, and the tokens after `layers`."""
    x, grid = self.embed(images)
    taps = []
    for i, blk in enumerate(self.blocks):
      if self.cfg.remat == 'none':
        x = blk(x, grid, self.jumbo_mlp)
      else:
        x = nnx.remat(lambda m, mlp, y: m(y, grid, mlp), policy=vit.REMAT_POLICIES[self.cfg.remat])(
            blk, self.jumbo_mlp, x)
      if i in layers:
        taps.append(x)
    return x, grid, taps

  def pooled_features(self, images: jax.Array) -> jax.Array:
    """What the head reads: the J class tokens concatenated, (B, J * C), after the final norm and PRR."""
    x, _, _ = self.encode(images)
    b, _, c = x.shape
    j = self.cfg.num_class_tokens
    cls = self.norm(x[:, :j].reshape(b, j * c))
    if not self.cfg.prr:
      return cls
    tokens = jnp.concatenate([cls.reshape(b, j, c), self.norm_patches(x[:, j:])], axis=1)
    return locat.prr(tokens, self.cfg.num_heads, num_queries=j).reshape(b, j * c)


# The registry's handles on this family (models/registry.py).
Config = JumboConfig
Model = Jumbo
