"""PNG pictures for humans: image grids, segmentation panels, GAug kernels, attention maps, bar charts.

Pillow and NumPy only. Small images are enlarged with nearest-neighbour so that pixels and patches
stay visible; text uses PIL's default font. Images may be uint8 or float (e.g. normalised model
inputs); floats are min-max scaled for display.

The GAug and attention pictures rerun the model's blocks in evaluation mode, the blocks asked for
with their attention sowing the GAug terms and probabilities it computes (vit.Attention).
"""

from __future__ import annotations

import colorsys
import io
import math
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont

from locatvit_jax import paths
from locatvit_jax.data.seg_sources import IGNORE_INDEX
from locatvit_jax.models import vit

CELL = 160  # smallest side of a picture in a grid, in pixels
PAD = 6
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
QUERY_OUTLINE = (0, 255, 255)
# What vit.Attention sows with sow_attention that attention_internals returns (not the trainer's means).
INTERNALS = ('var', 'alpha', 'bias', 'probs')
# Anchors of the heat colour map, from 0 (cold) to 1 (hot): black, purple, red, orange, yellow.
HEAT_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def _font(size: int = 12) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=size)


def _text_size(text: str, font) -> tuple[int, int]:
  left, top, right, bottom = ImageDraw.Draw(Image.new('RGB', (1, 1))).multiline_textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def to_uint8(image) -> np.ndarray:
  """(H, W, 3) or (H, W) uint8 for display: uint8 as is, anything else min-max scaled."""
  x = np.asarray(image)
  if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (1, 3)):
    raise ValueError(f'image of shape {x.shape}; expected (H, W), (H, W, 1) or (H, W, 3)')
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.dtype == np.uint8:
    return x
  x = x.astype(np.float32)
  lo, hi = float(x.min()), float(x.max())
  return np.round((x - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)


def enlarge(image: np.ndarray, min_side: int = CELL) -> np.ndarray:
  """Nearest-neighbour enlargement by the smallest integer factor giving a side >= min_side."""
  factor = max(1, math.ceil(min_side / min(image.shape[:2])))
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _rgb(image: np.ndarray) -> np.ndarray:
  return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def tile(cells: Sequence[np.ndarray], cols: int, captions: Sequence[str] | None = None,
         title: str | None = None) -> Image.Image:
  """Grid of uint8 RGB cells (sizes may differ: each slot is the largest cell) with captions below."""
  if not cells:
    raise ValueError('nothing to tile: expected at least one image')
  if captions is not None and len(captions) != len(cells):
    raise ValueError(f'{len(captions)} captions for {len(cells)} images; expected one per image')
  font = _font()
  cap_h = max((_text_size(c, font)[1] for c in captions or () if c), default=0)
  cap_h += PAD if cap_h else 0
  cell_h = max(c.shape[0] for c in cells)
  cell_w = max([c.shape[1] for c in cells] + [_text_size(c, font)[0] for c in captions or ()])
  title_h = _text_size(title, _font(14))[1] + 2 * PAD if title else 0
  rows = math.ceil(len(cells) / cols)
  cols = min(cols, len(cells))
  canvas = Image.new('RGB', (PAD + cols * (cell_w + PAD), title_h + PAD + rows * (cell_h + cap_h + PAD)), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((PAD, PAD), title, fill=TEXT, font=_font(14))
  for i, cell in enumerate(cells):
    r, c = divmod(i, cols)
    x, y = PAD + c * (cell_w + PAD), title_h + PAD + r * (cell_h + cap_h + PAD)
    canvas.paste(Image.fromarray(_rgb(cell)), (x, y))
    if captions and captions[i]:
      draw.multiline_text((x, y + cell.shape[0] + PAD // 2), captions[i], fill=TEXT, font=font)
  return canvas


def _save(path: str, picture: Image.Image) -> str:
  buffer = io.BytesIO()
  picture.save(buffer, format='PNG')
  paths.write_bytes(path, buffer.getvalue())
  return path


def save_image_grid(path: str, images: Sequence, labels: Sequence | None = None, cols: int = 8,
                    title: str | None = None) -> str:
  """Images in a grid, each with its label (any value; str() is printed) below. Returns `path`."""
  cells = [enlarge(to_uint8(im)) for im in images]
  captions = None if labels is None else [str(l) for l in labels]
  return _save(path, tile(cells, cols, captions, title))


# -- segmentation --------------------------------------------------------------------------------
def seg_palette(num_classes: int) -> np.ndarray:
  """(256, 3) uint8 colours indexed by class: distinct hues for 0..num_classes-1, black elsewhere.

  Fixed (no randomness) so the same class has the same colour in every picture. Class 255, the
  ignore index, is black.
  """
  if not 1 <= num_classes < IGNORE_INDEX:
    raise ValueError(f'num_classes={num_classes}; expected 1..{IGNORE_INDEX - 1}')
  palette = np.zeros((256, 3), np.uint8)
  golden = (math.sqrt(5) - 1) / 2  # successive hues as far apart as possible, for any count
  for k in range(num_classes):
    hue = (k * golden) % 1.0
    sat, val = (0.85, 0.95) if k % 3 == 0 else (0.55, 0.85) if k % 3 == 1 else (0.95, 0.65)
    palette[k] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
  return palette


def colourise(mask, palette: np.ndarray) -> np.ndarray:
  """(H, W) integer class map -> (H, W, 3) uint8 colours."""
  m = np.asarray(mask)
  if m.ndim == 3 and m.shape[-1] == 1:
    m = m[..., 0]
  if m.ndim != 2 or m.size == 0 or m.min() < 0 or m.max() > 255:
    raise ValueError(f'mask of shape {m.shape} and values {m.min() if m.size else None}..'
                     f'{m.max() if m.size else None}; expected (H, W) classes in 0..255')
  return palette[m.astype(np.int64)]


def _legend(classes: Sequence[int], palette: np.ndarray, width: int, names: Sequence[str] | None) -> np.ndarray:
  """A strip of colour swatches with class ids (or names), wrapped to `width` pixels."""
  font = _font()
  labels = [str(c) if names is None else f'{c} {names[c]}' for c in classes]
  sw = _text_size('0', font)[1] + 4
  items = [(sw + 4 + _text_size(l, font)[0] + 2 * PAD, l, c) for l, c in zip(labels, classes)]
  lines, line, used = [], [], 0
  for item in items:
    if line and used + item[0] > width:
      lines.append(line)
      line, used = [], 0
    line.append(item)
    used += item[0]
  lines.append(line)
  strip = Image.new('RGB', (width, len(lines) * (sw + PAD) + PAD), BACKGROUND)
  draw = ImageDraw.Draw(strip)
  for r, line in enumerate(lines):
    x, y = 0, PAD + r * (sw + PAD)
    for w, label, c in line:
      draw.rectangle((x, y, x + sw, y + sw), fill=tuple(int(v) for v in palette[c]), outline=TEXT)
      draw.text((x + sw + 4, y + 1), label, fill=TEXT, font=font)
      x += w
  return np.asarray(strip)


def save_segmentation_panels(path: str, images: Sequence, labels: Sequence, preds: Sequence,
                             palette: np.ndarray, class_names: Sequence[str] | None = None) -> str:
  """One row per example: image | ground truth | prediction, and a legend of the classes shown.

  Labels and predictions are (H, W) class maps of the image's size (255 = ignored, black).
  """
  if not len(images) == len(labels) == len(preds) > 0:
    raise ValueError(f'{len(images)} images, {len(labels)} labels, {len(preds)} predictions; '
                     'expected the same positive number of each')
  cells, captions = [], []
  for i, (image, label, pred) in enumerate(zip(images, labels, preds)):
    image = to_uint8(image)
    label, pred = np.asarray(label), np.asarray(pred)
    if not image.shape[:2] == label.shape[:2] == pred.shape[:2]:
      raise ValueError(f'example {i}: image {image.shape[:2]}, label {label.shape[:2]}, prediction '
                       f'{pred.shape[:2]}; expected the same height and width')
    cells += [enlarge(_rgb(image)), enlarge(colourise(label, palette)), enlarge(colourise(pred, palette))]
    captions += [f'image {i}', 'ground truth', 'prediction']
  grid = np.asarray(tile(cells, 3, captions))
  shown = np.unique(np.concatenate([np.unique(np.asarray(m)) for m in (*labels, *preds)]))
  legend = _legend([int(c) for c in shown if c != IGNORE_INDEX], palette, grid.shape[1], class_names)
  return _save(path, Image.fromarray(np.concatenate([grid, legend], axis=0)))


# -- GAug kernels and attention ------------------------------------------------------------------
def _check_queries(query_patches: Sequence[tuple[int, int]], grid: tuple[int, int]) -> list[tuple[int, int]]:
  queries = [tuple(int(v) for v in q) for q in query_patches]
  bad = [q for q in queries if len(q) != 2 or not (0 <= q[0] < grid[0] and 0 <= q[1] < grid[1])]
  if bad or not queries:
    raise ValueError(f'query_patches {list(query_patches)}; expected (row, col) pairs on the '
                     f'{grid[0]}x{grid[1]} patch grid')
  return queries


def attention_internals(model, image, layers: Sequence[int]) -> tuple[tuple[int, int], dict[int, dict]]:
  """Per requested block: GAug 'var' (H, hw, 2), 'alpha' (H, hw), 'bias' S (H, hw, hw) of the
  patch queries (absent without GAug) and 'probs' (H, N, N), the softmax attention of all tokens.

  `image` is one model input (H, W, 3). Returns the patch grid and {block index: arrays}.
  """
  if model.cfg.FAMILY != vit.FAMILY:
    raise ValueError(f'attention pictures are drawn from ViT-family models (LocAtViT and its variants); this is '
                     f'a {model.cfg.FAMILY} model')
  wanted = set(vit.check_layers(layers, model.cfg.depth))
  model = nnx.view(model, deterministic=True)  # no drop path; the caller's model is untouched
  x, grid = model.embed(jnp.asarray(image, jnp.float32)[None])
  out = {}
  for i in range(max(wanted) + 1):
    blk = nnx.view(model.blocks[i], sow_attention=i in wanted)
    x = blk(x, grid, model.cfg.num_prefix)
    if i in wanted:
      sown = nnx.to_pure_dict(nnx.pop(blk, nnx.Intermediate))['attn']
      out[i] = {name: np.asarray(sown[name][0][0]) for name in INTERNALS if name in sown}
  return grid, out


def heat_colours(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> uint8 RGB through HEAT_ANCHORS."""
  t = np.clip(values, 0, 1) * (len(HEAT_ANCHORS) - 1)
  lo = np.minimum(np.floor(t).astype(np.int64), len(HEAT_ANCHORS) - 2)
  frac = (t - lo)[..., None]
  return np.round(HEAT_ANCHORS[lo] * (1 - frac) + HEAT_ANCHORS[lo + 1] * frac).astype(np.uint8)


def _overlay(image: np.ndarray, heat: np.ndarray, query: tuple[int, int]) -> np.ndarray:
  """A (h, w) map scaled to its max, coloured, blended over the image; the query patch outlined."""
  grid = heat.shape
  top = float(heat.max())
  coloured = heat_colours(heat / top if top > 0 else heat)
  ph, pw = image.shape[0] // grid[0], image.shape[1] // grid[1]
  coloured = np.repeat(np.repeat(coloured, ph, axis=0), pw, axis=1)
  grey = np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)
  blended = (0.35 * grey + 0.65 * coloured).astype(np.uint8)
  big = enlarge(blended)
  s = big.shape[0] // image.shape[0]
  picture = Image.fromarray(big)
  r, c = query
  ImageDraw.Draw(picture).rectangle((c * pw * s, r * ph * s, (c + 1) * pw * s - 1, (r + 1) * ph * s - 1),
                                    outline=QUERY_OUTLINE, width=2)
  return np.asarray(picture)


def _query_maps(path, model, image, layers, query_patches, per_head, kind):
  grid, internals = attention_internals(model, image, layers)
  queries = _check_queries(query_patches, grid)
  shown = _rgb(to_uint8(image))
  p, nh = model.cfg.num_prefix, model.cfg.num_heads
  heads = list(range(nh)) if per_head else [None]
  cells, captions = [], []
  for layer in vit.check_layers(layers, model.cfg.depth):
    found = internals[layer]
    for r, c in queries:
      i = r * grid[1] + c  # row-major patch index
      for head in heads:
        pick = (lambda a: a.mean(0)) if head is None else (lambda a: a[head])
        who = 'mean of heads' if head is None else f'head {head}'
        if kind == 'kernel':
          heat = pick(found['bias'][:, i])
          var, alpha = pick(found['var'][:, i]), pick(found['alpha'][:, i])
          detail = f'alpha {alpha:.2f}, var {var[0]:.2f}/{var[1]:.2f}'
        else:
          row = pick(found['probs'][:, p + i])
          heat = row[p:]
          detail = f'to prefix {row[:p].sum():.0%}' if p else f'max {heat.max():.2f}'
        cells.append(_overlay(shown, heat.reshape(grid), (r, c)))
        captions.append(f'block {layer}, query ({r},{c})\n{who}\n{detail}')
  cols = len(queries) * len(heads)
  title = ('GAug kernel S of each query over the patches (scaled to its max)' if kind == 'kernel'
           else 'Attention of each query over the patches, GAug bias included (scaled to its max)')
  return _save(path, tile(cells, cols, captions, title))


def save_gaug_kernels(path: str, model, image, layers: Sequence[int], query_patches: Sequence[tuple[int, int]],
                      per_head: bool = False) -> str:
  """Rows: blocks; columns: queries (x heads). Each cell is the Gaussian bias S of one query over
  the patch grid, over the image, with that query's alpha and row/column variances.

  `image` is one model input (H, W, 3); `query_patches` are (row, col) on the patch grid.
  """
  if not model.cfg.gaug:
    raise ValueError('the model has no GAug (cfg.gaug=False): there is no kernel to draw')
  return _query_maps(path, model, image, layers, query_patches, per_head, 'kernel')


def save_attention_maps(path: str, model, image, layers: Sequence[int], query_patches: Sequence[tuple[int, int]],
                        per_head: bool = False) -> str:
  """As `save_gaug_kernels`, but each cell is the query's softmax attention over the patch keys
  (GAug bias included when the model has it); the caption gives the share that went to prefix tokens.
  """
  return _query_maps(path, model, image, layers, query_patches, per_head, 'attention')


# -- bar chart -----------------------------------------------------------------------------------
def save_bar_chart(path: str, groups: Mapping[str, Mapping[str, Sequence[float]]], title: str | None = None) -> str:
  """One panel per metric, one bar per variant: the mean of its runs, with +-1 std error bars.

  `groups` maps variant -> metric -> values over runs (seeds), e.g.
  {'vit': {'top1': [71.2, 71.5], 'miou': [40.1, 40.4]}, 'locatvit': {...}}. The std is the sample
  std (0 for a single run).
  """
  if not groups:
    raise ValueError('groups is empty; expected {variant: {metric: [values]}}')
  metric_names = list(dict.fromkeys(m for per_metric in groups.values() for m in per_metric))
  for variant, per_metric in groups.items():
    empty = [m for m, v in per_metric.items() if len(v) == 0]
    if empty:
      raise ValueError(f'variant {variant!r} has no values for {empty}; expected at least one run each')
  font = _font()
  variants = list(groups)
  bar_w, gap, plot_h = 56, 24, 260
  label_w = max(_text_size(v, font)[0] for v in variants)
  bar_w = max(bar_w, label_w + 4)
  axis_w = 48
  panel_w = axis_w + len(variants) * (bar_w + gap) + gap
  panels = []
  for metric in metric_names:
    stats = {v: (float(np.mean(groups[v][metric])),
                 float(np.std(groups[v][metric], ddof=1)) if len(groups[v][metric]) > 1 else 0.0)
             for v in variants if metric in groups[v]}
    top = max(m + s for m, s in stats.values())
    top = top * 1.15 if top > 0 else 1.0
    panel = Image.new('RGB', (panel_w, plot_h + 80), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    y0 = 30 + plot_h  # the zero line
    to_y = lambda value: y0 - plot_h * value / top
    draw.text((axis_w, 6), metric, fill=TEXT, font=_font(14))
    for k in range(5):  # horizontal grid lines with their values
      value = top * k / 4
      draw.line((axis_w, to_y(value), panel_w - gap // 2, to_y(value)), fill=(220, 220, 220))
      draw.text((4, to_y(value) - 6), f'{value:.3g}', fill=TEXT, font=font)
    draw.line((axis_w, y0, panel_w - gap // 2, y0), fill=TEXT)
    for j, variant in enumerate(variants):
      if variant not in stats:
        continue
      mean, std = stats[variant]
      x = axis_w + gap + j * (bar_w + gap)
      colour = tuple(int(v) for v in seg_palette(len(variants))[j])
      draw.rectangle((x, to_y(max(mean, 0)), x + bar_w, y0), fill=colour, outline=TEXT)
      mid = x + bar_w // 2
      if std > 0:
        draw.line((mid, to_y(mean - std), mid, to_y(mean + std)), fill=TEXT, width=2)
        for value in (mean - std, mean + std):
          draw.line((mid - 8, to_y(value), mid + 8, to_y(value)), fill=TEXT, width=2)
      value_text = f'{mean:.2f}' + (f'\n±{std:.2f}' if std > 0 else '')
      draw.multiline_text((x, to_y(mean + std) - 30), value_text, fill=TEXT, font=font)
      n = len(groups[variant][metric])
      draw.multiline_text((x, y0 + 6), f'{variant}\n{n} run{"s" if n > 1 else ""}', fill=TEXT, font=font)
    panels.append(np.asarray(panel))
  return _save(path, tile(panels, len(panels), title=title))
