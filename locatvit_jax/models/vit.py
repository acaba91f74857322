"""ViT backbone with LocAt switches (spec sections 1-4).

One size table, one config dataclass, one model. Plain ViT, GAug only, PRR only, LocAtViT, GAP
pooling and no position embedding are all this model with flags, so the paper's baselines and
ablations share every line of code.

Images are float NHWC of any size whose sides are multiples of the patch size. The position
embedding is resampled and the GAug variances rescaled when the patch grid differs from the one the
model was built for.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from locatvit_jax.models import attention, init, locat, registry

FAMILY = 'vit'

# size: (width, depth, heads, mlp_dim, drop_path). Head dim is 64 everywhere.
SIZES = {
    'ti': (192, 12, 3, 768, 0.1),
    's': (384, 12, 6, 1536, 0.2),
    'b': (768, 12, 12, 3072, 0.4),
    'l': (1024, 24, 16, 4096, 0.4),
}
MODEL_NAMES = tuple(f'{kind}_{size}16' for size in SIZES for kind in ('vit', 'locatvit'))
_NAME_RE = re.compile(r'^(vit|locatvit)_(ti|s|b|l)(\d+)$')
# Other spellings of the same models -> ours. The authors register LocAtViT as locatvit_{tiny,small,base}
# (their models/vit.py: timm's ViT, patch 16, 224 px, class token, learned position embedding, no
# registers, GAug and PRR on); timm's plain ViTs of our sizes are vit_*_patch16_224, and the authors'
# plain ViTs without position embedding nopos_vit_*_patch16_224 (ALIAS_FIELDS). Their Swin, RoPE and
# Jumbo models are families of their own (models/registry.py).
MODEL_ALIASES = {
    'locatvit_tiny': 'locatvit_ti16',
    'locatvit_small': 'locatvit_s16',
    'locatvit_base': 'locatvit_b16',
    'vit_tiny_patch16_224': 'vit_ti16',
    'vit_small_patch16_224': 'vit_s16',
    'vit_base_patch16_224': 'vit_b16',
    'vit_large_patch16_224': 'vit_l16',
    'nopos_vit_tiny_patch16_224': 'vit_ti16',
    'nopos_vit_base_patch16_224': 'vit_b16',
}
# What an alias fixes besides its model's size. The authors' NoPosVisionTransformer prepends the class
# token and adds nothing; timm's own pos_embed='none' never prepends the class token at all (its
# _pos_embed returns early in timm 1.0.19), which is why they wrote theirs, and why layouts/vit.py
# refuses timm's.
ALIAS_FIELDS = {
    'nopos_vit_tiny_patch16_224': dict(pos_embed='none'),
    'nopos_vit_base_patch16_224': dict(pos_embed='none'),
}

# The paper's baselines and ablations: flags on the same model (a config argument picks one).
VARIANTS = {
    'locat': dict(gaug=True, prr=True),  # LocAtViT
    'vit': dict(gaug=False, prr=False),  # plain ViT baseline
    'gaug': dict(gaug=True, prr=False),  # ablation: GAug only
    'prr': dict(gaug=False, prr=True),  # ablation: PRR only
    # Global average pooling as the authors ran it (timm's global_pool='avg'): the class token stays,
    # attends and has its position row, but the head reads the mean of the patch tokens.
    'gap': dict(gaug=False, prr=False, pool='gap', class_token=True),
    'locat_gap': dict(gaug=True, prr=True, pool='gap', class_token=True),
    # RegViT: register tokens after the class token. The paper does not state how many; 4, as timm's
    # *_reg4 models have (--config.model.reg_tokens=N for another count).
    'reg': dict(gaug=False, prr=False, reg_tokens=4),
    'locat_reg': dict(gaug=True, prr=True, reg_tokens=4),
    # No position embedding, as the authors' NoPosVisionTransformer and no_pos_emb=True (ALIAS_FIELDS).
    'nopos': dict(gaug=False, prr=False, pos_embed='none'),
    'locat_nopos': dict(gaug=True, prr=True, pos_embed='none'),
}


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# (mean, std) of [0, 1] RGB that the family's models expect: timm's ViT default config's, which the
# authors' recipes keep (configs/common.py, predict.preprocess, the Hugging Face config).
NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# timm's VisionTransformer.no_weight_decay() (train/optim.py): not register tokens, which timm 1.0.19
# decays.
NO_WEIGHT_DECAY = ('pos_embed', 'cls_token', 'dist_token')
# No float16: the reference caps its distances for fp16, which this port does not reproduce.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _pair(x) -> tuple[int, int]:
  return (int(x), int(x)) if isinstance(x, (int, float)) else tuple(int(v) for v in x)


class PatchTokens:
  """Properties of the configs whose tokens are patches of `patch_size` pixels, `width` wide: the ViT's,
  RoPE-Mixed ViT's and Jumbo's."""

  @property
  def grid(self) -> tuple[int, int]:
    """The patch grid of `img_size`, which GAug's constants (and a position embedding) are built for."""
    return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

  @property
  def feature_dim(self) -> int:
    """Channels of features()."""
    return self.width

  @property
  def feature_stride(self) -> int:
    """Pixels per cell of features()."""
    return self.patch_size


@dataclasses.dataclass(frozen=True)
class ViTConfig(PatchTokens, registry.ModelConfig):
  """Everything that defines the architecture and how it computes. Serialised next to params."""

  FAMILY: ClassVar[str] = FAMILY

  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  patch_size: int = 16
  img_size: tuple[int, int] = (224, 224)  # the grid GAug constants and pos_embed are built for
  num_classes: int = 1000  # 0: no head, the model returns pooled features
  gaug: bool = True
  prr: bool = True
  pool: str = 'token'  # 'token' (class token) | 'gap' (mean of patch tokens, then the final norm)
  # None: exactly when pool='token'. timm's GAP ViTs may keep one: it attends but is not pooled
  # (the 'gap' variants do, as the authors' runs did).
  class_token: bool | None = None
  pos_embed: str = 'learn'  # 'learn' | 'none'
  reg_tokens: int = 0
  drop_path: float = 0.0  # the last block's rate; linear from 0 over depth
  dtype: str = 'float32'  # matmul dtype; params, norms, GAug and softmax stay float32
  gaug_impl: str = 'fused'  # models/attention.py; fused trains fastest at 224 px on CPU (benchmarks)
  remat: str = 'none'  # see REMAT_POLICIES

  def __post_init__(self):
    object.__setattr__(self, 'img_size', _pair(self.img_size))
    if self.class_token is None:
      object.__setattr__(self, 'class_token', self.pool == 'token')
    positive = {'width': self.width, 'depth': self.depth, 'num_heads': self.num_heads,
                'mlp_dim': self.mlp_dim, 'patch_size': self.patch_size,
                'img_size': min(self.img_size)}
    self.validate(positive, [
        (self.width % self.num_heads == 0, f'width={self.width} must be a multiple of num_heads={self.num_heads}'),
        (self.pool in ('token', 'gap'), f"pool={self.pool!r}; expected 'token' or 'gap'"),
        (self.class_token or self.pool != 'token', "pool='token' needs class_token=True: it pools the class token"),
        (self.pos_embed in ('learn', 'none'), f"pos_embed={self.pos_embed!r}; expected 'learn' or 'none'"),
        (self.reg_tokens >= 0, f'reg_tokens={self.reg_tokens}; expected >= 0'),
    ])

  @property
  def num_prefix(self) -> int:
    return int(self.class_token) + self.reg_tokens


def model_config(name: str, **overrides) -> ViTConfig:
  """`locatvit_b16` (or `locatvit_base`) -> ViTConfig of ViT-B/16 with GAug and PRR; overrides win."""
  m = _NAME_RE.match(MODEL_ALIASES.get(name, name))
  if not m:
    raise ValueError(f'unknown model name {name!r}; expected one of {MODEL_NAMES} or {tuple(MODEL_ALIASES)}')
  kind, size, patch = m.groups()
  width, depth, heads, mlp, dpr = SIZES[size]
  locat_on = kind == 'locatvit'
  base = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=int(patch),
              drop_path=dpr, gaug=locat_on, prr=locat_on, **ALIAS_FIELDS.get(name, {}))
  base.update(overrides)
  return ViTConfig.from_dict(base)


def check_layers(layers: Sequence[int], depth: int) -> list[int]:
  """Block indices, negative ones counted from the end, as 0..depth-1; at least one."""
  bad = [l for l in layers if not -depth <= l < depth]
  if bad or not layers:
    raise ValueError(f'layers {list(layers)}; expected block indices in -{depth}..{depth - 1} '
                     f'(the model has {depth} blocks)')
  return [l % depth for l in layers]


class PatchConv(nnx.Conv):
  """The patch embedding: a p x p convolution with stride p from RGB (nnx.Conv's parameters, so the
  same `kernel` (p, p, 3, C) and `bias` and the same checkpoints; PyTorch's default Conv2d init, which
  timm leaves in place), computed as one matmul of the flattened patches with the flattened kernel.
  The two are the same sums; XLA:CPU runs the strided convolution's weight gradient as a dilated
  convolution, 1.45 s of a 3.7 s LocAtViT-Ti train step at 224 px, where the matmul takes
  milliseconds. Inputs are NHWC with sides that are multiples of p (the models check or pad)."""

  def __init__(self, out_features: int, patch_size: int, dtype, rngs: nnx.Rngs):
    p = patch_size
    conv_init = init.torch_conv_default(3 * p * p)
    super().__init__(3, out_features, kernel_size=(p, p), strides=(p, p), padding='VALID',
                     kernel_init=conv_init, bias_init=conv_init, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    b, hgt, wid, c = images.shape
    p = self.kernel_size[0]
    patches = images.reshape(b, hgt // p, p, wid // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, hgt // p, wid // p, p * p * c)
    kernel, bias = self.kernel[...], self.bias[...]
    if self.dtype is not None:
      patches, kernel, bias = (t.astype(self.dtype) for t in (patches, kernel, bias))
    # Over rows, for the weight gradient's sake (`Linear`).
    rows = jnp.dot(patches.reshape(-1, p * p * c), kernel.reshape(p * p * c, -1), precision=self.precision)
    return (rows + bias).reshape(b, hgt // p, wid // p, -1)


class Linear(nnx.Linear):
  """nnx.Linear (the same parameters, initialisers and math) applied to its input flattened to rows.

  Autodiff of a matmul over (B, N, C) tokens gives a weight gradient that contracts two dimensions,
  (B, N); XLA:CPU canonicalises such a dot by transposing its operands into copies, (C, B, N) and
  (C', B, N), where the same gradient over rows (B * N, C) runs as one matmul of the arrays as they
  are. On a ViT-Ti train step at 224 px those copies were a fifth of the operations' time
  (benchmarks/README.md)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in PyTorch's formula, x (1 + erf(x / sqrt 2)) / 2. jax.nn.gelu(approximate=False)
  writes it with erfc, which XLA:CPU evaluates with an exp and two branches per element: 150 ms of
  a 2.2 s LocAtViT-Ti train step at 224 px, where erf's single rational polynomial costs a fraction."""
  return x * (1 + jax.lax.erf(x * (2 ** -0.5))) / 2


class Mlp(nnx.Module):

  def __init__(self, width, hidden, dtype, rngs):
    lin = lambda i, o: Linear(i, o, kernel_init=init.TRUNC_NORMAL, bias_init=init.ZEROS,
                              dtype=dtype, rngs=rngs)
    self.fc1 = lin(width, hidden)
    self.fc2 = lin(hidden, width)

  def __call__(self, x):
    return self.fc2(gelu(self.fc1(x)))


class Attention(nnx.Module):
  """Multi-head self-attention, with the GAug bias when cfg.gaug.

  For inspection (viz), `nnx.view(model, sow_attention=True)` makes it compute attention densely and
  sow, as nnx.Intermediate, what it computed: 'probs' (B, H, N, N), the softmax over all tokens, and
  with GAug the patch queries' 'var' (B, H, hw, 2), 'alpha' (B, H, hw) and 'bias' S (B, H, hw, hw).
  """

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    lin = lambda i, o: Linear(i, o, kernel_init=init.TRUNC_NORMAL, bias_init=init.ZEROS,
                              dtype=dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.gaug_impl = cfg.gaug_impl
    self.qkv = lin(cfg.width, 3 * cfg.width)
    self.proj = lin(cfg.width, cfg.width)
    self.geometry = locat.GAugGeometry(cfg.grid)
    self.gaug = locat.GAug(cfg.width // cfg.num_heads, self.geometry, rngs=rngs) if cfg.gaug else None
    # Set by the trainer (model.set_attributes(collect_stats=True)) to sow mean GAug var/alpha.
    self.collect_stats = False
    self.sow_attention = False  # set with nnx.view (class docstring)

  def set_view(self, sow_attention: bool | None = None):
    """Used by nnx.view: `sow_attention` (class docstring)."""
    if sow_attention is not None:
      self.sow_attention = sow_attention

  def __call__(self, x, grid, num_prefix, rotate=None):
    """`rotate`, a function of (B, H, N, d), turns q and k after GAug has read q (RoPE-Mixed ViT)."""
    b, n, c = x.shape
    h, d = self.num_heads, c // self.num_heads
    # The projections run over rows (`Linear`), with the head transposes as copies: einsums over
    # head views of the kernels avoid those copies but contract (B, N) in their weight gradients,
    # which costs XLA:CPU more (benchmarks/README.md).
    qkv = self.qkv(x).reshape(b, n, 3, h, d).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, d)
    var = alpha = None
    if self.gaug is not None:
      # GAug reads the unscaled queries, before any rotation, from the input and the q projection.
      var, alpha = self.gaug(x, self.qkv.kernel[...][:, :c], self.qkv.bias[...][:c], h, grid, num_prefix)
      if self.collect_stats:
        self.sow(nnx.Intermediate, 'gaug_var', jnp.mean(var))
        self.sow(nnx.Intermediate, 'gaug_alpha', jnp.mean(alpha))
    if rotate is not None:
      q, k = rotate(q), rotate(k)
    q = q * d ** -0.5
    if self.sow_attention:
      o = self._sown_attention(q, k, v, var, alpha, grid, num_prefix)
    elif self.gaug is None:
      o = attention.plain_attention(q, k, v)
    else:
      o = attention.gaug_attention(q, k, v, var, alpha, grid=grid, geometry=self.geometry,
                                   num_prefix=num_prefix, impl=self.gaug_impl)
    return self.proj(o.transpose(0, 2, 1, 3).reshape(b, n, c))

  def _sown_attention(self, q, k, v, var, alpha, grid, num_prefix):
    """gaug_impl 'dense' (or plain attention), sowing the probabilities it attends with."""
    bias = None
    if var is not None:
      bias = locat.dense_bias(var, alpha, grid, self.geometry, num_prefix)
      self.sow(nnx.Intermediate, 'var', var)
      self.sow(nnx.Intermediate, 'alpha', alpha)
      self.sow(nnx.Intermediate, 'bias', bias[:, :, num_prefix:, num_prefix:])
    p = attention.probabilities(q, k, bias)
    self.sow(nnx.Intermediate, 'probs', p)
    return attention.attend(p, v)


class Block(nnx.Module):
  """Pre-norm transformer block with per-sample stochastic depth on both residual branches."""

  def __init__(self, cfg: ViTConfig, drop_path: float, rngs: nnx.Rngs, drop_rngs: nnx.Rngs):
    ln = lambda: nnx.LayerNorm(cfg.width, epsilon=1e-6, rngs=rngs)
    self.norm1 = ln()
    self.attn = Attention(cfg, rngs)
    self.norm2 = ln()
    self.mlp = Mlp(cfg.width, cfg.mlp_dim, DTYPES[cfg.dtype], rngs)
    # Dropout with the mask broadcast over tokens and channels is exactly timm's DropPath.
    self.drop_path1 = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=drop_rngs)
    self.drop_path2 = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=drop_rngs)

  def __call__(self, x, grid, num_prefix):
    x = x + self.drop_path1(self.attn(self.norm1(x), grid, num_prefix).astype(x.dtype))
    return x + self.drop_path2(self.mlp(self.norm2(x)).astype(x.dtype))


def resample_pos_embed(pos_embed: jax.Array, num_prefix: int, grid0, grid) -> jax.Array:
  """Keep the prefix rows; resize the patch rows as a (h0, w0, C) image, bicubic with antialias.

  jax.image.resize's cubic is Keys a=-0.5 with half-pixel centres, and its antialiasing widens the
  kernel and renormalises at the borders as PyTorch's interpolate(bicubic, antialias=True) does.
  """
  if tuple(grid) == tuple(grid0):
    return pos_embed
  prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
  c = pos_embed.shape[-1]
  img = patches.reshape(grid0[0], grid0[1], c)
  img = jax.image.resize(img, (grid[0], grid[1], c), method='cubic', antialias=True)
  return jnp.concatenate([prefix, img.reshape(1, grid[0] * grid[1], c).astype(pos_embed.dtype)], 1)


class ViT(nnx.Module):
  """ViT / LocAtViT. `model(images)` -> logits; `model.features(images)` -> (B, h, w, C)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, p = cfg.width, cfg.patch_size
    self.patch_embed = PatchConv(c, p, DTYPES[cfg.dtype], rngs)
    self.cls_token = nnx.Param(init.CLS_TOKEN(rngs.params(), (1, 1, c))) if cfg.class_token else None
    self.reg_token = nnx.Param(init.CLS_TOKEN(rngs.params(), (1, cfg.reg_tokens, c))) if cfg.reg_tokens else None
    if cfg.pos_embed == 'learn':
      n = cfg.num_prefix + cfg.grid[0] * cfg.grid[1]
      self.pos_embed = nnx.Param(init.TRUNC_NORMAL(rngs.params(), (1, n, c)))
    else:
      self.pos_embed = None
    rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    # A stream tagged 'dropout' even when the caller passed only a seed, so that trainers can
    # reseed it per step with nnx.reseed(model, dropout=key).
    drop_rngs = nnx.Rngs(dropout=rngs['dropout']())
    self.blocks = nnx.List([Block(cfg, r, rngs, drop_rngs) for r in rates])
    # 'token' pooling normalises all tokens before PRR; 'gap' normalises the pooled vector (timm's fc_norm).
    self.norm = nnx.LayerNorm(c, epsilon=1e-6, rngs=rngs)
    self.head = (nnx.Linear(c, cfg.num_classes, kernel_init=init.TRUNC_NORMAL, bias_init=init.ZEROS, rngs=rngs)
                 if cfg.num_classes else None)

  # -- tokens ----------------------------------------------------------------------------------
  def grid_of(self, images: jax.Array) -> tuple[int, int]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images of shape {images.shape}; expected (batch, height, width, 3) NHWC')
    p = self.cfg.patch_size
    hgt, wid = images.shape[1:3]
    if hgt % p or wid % p or hgt == 0 or wid == 0:
      raise ValueError(f'image size {hgt}x{wid} is not a positive multiple of the patch size {p}')
    return hgt // p, wid // p

  def embed(self, images: jax.Array):
    """Patch tokens with prefix tokens in front and position embedding added: (B, N, C), grid."""
    grid = self.grid_of(images)
    x = self.patch_embed(images).astype(jnp.float32)
    b = x.shape[0]
    x = x.reshape(b, grid[0] * grid[1], -1)
    prefix = [t[...] for t in (self.cls_token, self.reg_token) if t is not None]
    x = jnp.concatenate([jnp.broadcast_to(t, (b,) + t.shape[1:]) for t in prefix] + [x], axis=1)
    if self.pos_embed is not None:
      x = x + self.position_embedding(grid)
    return x, grid

  def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
    """The position embedding for a `grid` of patches (resampled when it is not the built one)."""
    return resample_pos_embed(self.pos_embed[...], self.cfg.num_prefix, self.cfg.grid, grid)

  def encode(self, images: jax.Array, layers: Sequence[int] = ()):
    """Runs the blocks. Returns the last block's tokens, the grid, and the tokens after `layers`."""
    x, grid = self.embed(images)
    policy = REMAT_POLICIES[self.cfg.remat]
    taps = []
    for i, blk in enumerate(self.blocks):
      if self.cfg.remat == 'none':
        x = blk(x, grid, self.cfg.num_prefix)
      else:
        x = nnx.remat(lambda m, y: m(y, grid, self.cfg.num_prefix), policy=policy)(blk, x)
      if i in layers:
        taps.append(x)
    return x, grid, taps

  # -- heads -----------------------------------------------------------------------------------
  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.pooled_features(images)
    return self.head(x) if self.head is not None else x

  def pooled_features(self, images: jax.Array) -> jax.Array:
    """What the head reads: (B, C) after the final norm and PRR (k-NN and linear probes use it)."""
    x, _, _ = self.encode(images)
    cfg = self.cfg
    if cfg.pool == 'token':
      x = self.norm(x)
      if cfg.prr:
        x = locat.prr(x, cfg.num_heads, num_queries=1)
      x = x[:, 0]
    else:
      if cfg.prr:
        x = locat.prr(x, cfg.num_heads)
      x = self.norm(jnp.mean(x[:, cfg.num_prefix:], axis=1))
    return x

  def features(self, images: jax.Array, layers: Sequence[int] | None = None):
    """Dense features: patch tokens of the last block (no final norm, no PRR) as (B, h, w, C).

    With `layers` (block indices, negative allowed), a list of such maps, one per listed block.
    """
    if layers is None:
      x, grid, _ = self.encode(images)
      return self._to_map(x, grid)
    idx = check_layers(layers, self.cfg.depth)
    tapped = tuple(sorted(set(idx)))
    _, grid, taps = self.encode(images, layers=tapped)
    by_layer = dict(zip(tapped, taps))
    return [self._to_map(by_layer[i], grid) for i in idx]

  def _to_map(self, x, grid):
    return x[:, self.cfg.num_prefix:].reshape(x.shape[0], grid[0], grid[1], x.shape[-1])


# The registry's handles on this family (models/registry.py).
Config = ViTConfig
Model = ViT
