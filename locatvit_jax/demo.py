"""The offline demo: the project's whole job, small, on real handwriting (configs/demo.py).

`run` builds the digit-scene dataset (data/demo.py) on first use, pretrains a small model on the
scene labels with the classification trainer, finetunes the frozen-backbone segmentation head on the
masks with the segmentation trainer, draws GAug kernels and attention maps, and reports top-1 and
mIoU. `compare` does that for several variants and seeds and writes a table and a bar chart.
Both trainers are the ones ImageNet and ADE20K use: only the configs differ.
"""

from __future__ import annotations

import copy
import json
import statistics

import jax
import numpy as np
from absl import logging

from locatvit_jax import loading, paths, viz
from locatvit_jax.data import demo as demo_data
from locatvit_jax.data import sources, transforms
from locatvit_jax.models import vit
from locatvit_jax.train import classification, segmentation

VARIANT_NAMES = {'vit': 'ViT', 'gaug': 'GAug only', 'prr': 'PRR only', 'locat': 'LocAtViT'}


def _data_dir(config) -> str:
  return str(paths.path(config.data.data_dir or '~/.cache/locatvit_jax/tfds'))


def prepare_data(config) -> str:
  """Builds the dataset if needed (seconds, once) and returns its TFDS name."""
  return demo_data.build_demo_dataset(_data_dir(config), image_size=config.data.image_size,
                                      num_train=config.data.num_train, num_val=config.data.num_val,
                                      seed=config.data.seed)


def stage_configs(config, dataset: str, variant: str, seed: int, workdir: str):
  """The classification and segmentation configs of one demo run."""
  pre = copy.deepcopy(config.pretrain)
  pre.seed = seed
  pre.model.update(vit.variant_overrides(variant))
  pre.data.update(dict(kind='tfds', name=dataset, data_dir=_data_dir(config)))
  seg = copy.deepcopy(config.finetune)
  seg.seed = seed
  seg.init = str(paths.path(workdir) / 'pretrain' / 'export')
  seg.data.update(dict(kind='tfds', name=dataset, data_dir=_data_dir(config)))
  return pre, seg


def run_one(config, dataset: str, variant: str, seed: int, workdir: str) -> dict:
  """One pretraining + segmentation run; a finished stage in `workdir` is read back, not redone."""
  pre, seg = stage_configs(config, dataset, variant, seed, workdir)
  logging.info('[%s seed %d] pretraining on digit scenes', variant, seed)
  cls = classification.train_and_evaluate(pre, paths.path(workdir) / 'pretrain')
  logging.info('[%s seed %d] finetuning the segmentation head on the frozen backbone', variant, seed)
  segm = segmentation.train_and_evaluate(seg, paths.path(workdir) / 'segment')
  return {'variant': variant, 'seed': seed, 'top1': cls['eval_top1'], 'miou': segm['miou']}


def draw_pictures(config, dataset: str, workdir: str) -> list[str]:
  """GAug kernels and attention maps of the pretrained backbone on a few validation scenes."""
  model = loading.load(paths.path(workdir) / 'pretrain' / 'export')
  source = sources.tfds_source(dataset, 'validation', _data_dir(config))
  images = [np.asarray(transforms.to_rgb(source[i]['image'])) for i in range(config.num_pictures)]
  pictures = []
  for i, image in enumerate(images):
    x = (image.astype(np.float32) / 255.0 - 0.5) / 0.5
    if model.cfg.gaug:
      pictures.append(viz.save_gaug_kernels(paths.path(workdir) / f'gaug_kernels_{i}.png', model, x,
                                            layers=config.picture_layers, query_patches=config.picture_queries))
    pictures.append(viz.save_attention_maps(paths.path(workdir) / f'attention_{i}.png', model, x,
                                            layers=config.picture_layers, query_patches=config.picture_queries))
  return [str(p) for p in pictures]


def check_config(config) -> None:
  """The demo's own settings, checked before the dataset is built or anything is written."""
  if config.mode not in ('single', 'compare'):
    raise ValueError(f"config.mode={config.mode!r}; expected 'single' or 'compare'")
  setting, variants = (('config.compare.variants', config.compare.variants) if config.mode == 'compare'
                       else ('config.variant', (config.variant,)))
  unknown = [v for v in variants if v not in VARIANT_NAMES]
  if unknown:
    raise ValueError(f'{setting}: unknown demo variant {", ".join(map(repr, unknown))}; '
                     f'expected one of {sorted(VARIANT_NAMES)}')


def run(config, workdir: str) -> dict:
  """Dispatches on config.mode: 'single' (one run of config.variant) or 'compare' (variants x seeds)."""
  check_config(config)
  dataset = prepare_data(config)
  if config.mode == 'compare':
    return compare(config, dataset, workdir)
  result = run_one(config, dataset, config.variant, config.seed, workdir)
  if jax.process_index() == 0:
    pictures = draw_pictures(config, dataset, workdir)
    print(f'Pictures: {", ".join(pictures)} and {workdir}/segment/segmentation_step*.png', flush=True)
  print(f'DEMO RESULT ({VARIANT_NAMES[config.variant]}): top-1 {100 * result["top1"]:.2f}%  '
        f'mIoU {100 * result["miou"]:.2f}%', flush=True)
  return result


def compare(config, dataset: str, workdir: str) -> dict:
  rows = []
  for variant in config.compare.variants:
    for seed in config.compare.seeds:
      rows.append(run_one(config, dataset, variant, seed, str(paths.path(workdir) / f'{variant}_seed{seed}')))
  table = summarize(rows)
  if jax.process_index() == 0:
    text = compare_markdown(table, config)
    paths.write_text(paths.path(workdir) / 'compare.md', text)
    paths.write_text(paths.path(workdir) / 'compare.json', json.dumps(rows, indent=1))
    viz.save_bar_chart(paths.path(workdir) / 'compare.png', {
        VARIANT_NAMES[v]: {'top-1 (%)': [100 * r['top1'] for r in rows if r['variant'] == v],
                           'mIoU (%)': [100 * r['miou'] for r in rows if r['variant'] == v]}
        for v in table}, title='Digit scenes: mean and std over seeds')
    print(text, flush=True)
  return {'rows': rows, 'table': table}


def summarize(rows: list[dict]) -> dict:
  """variant -> {'top1': (mean, std), 'miou': (mean, std), 'n'} in percent."""
  table = {}
  for variant in dict.fromkeys(r['variant'] for r in rows):
    mine = [r for r in rows if r['variant'] == variant]
    stats = {}
    for key in ('top1', 'miou'):
      vals = [100 * r[key] for r in mine]
      stats[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    table[variant] = {**stats, 'n': len(mine)}
  return table


def compare_markdown(table: dict, config) -> str:
  lines = ['| model | top-1 (%) | mIoU (%) | seeds |', '|---|---|---|---|']
  for variant, s in table.items():
    lines.append(f'| {VARIANT_NAMES[variant]} | {s["top1"][0]:.2f} ± {s["top1"][1]:.2f} | '
                 f'{s["miou"][0]:.2f} ± {s["miou"][1]:.2f} | {s["n"]} |')
  seeds = ','.join(str(s) for s in config.compare.seeds)
  lines.append('')
  lines.append(f'Mean ± standard deviation over seeds {seeds}; digit scenes {config.data.image_size} px, '
               f'{config.data.num_train} train / {config.data.num_val} validation scenes.')
  return '\n'.join(lines) + '\n'
