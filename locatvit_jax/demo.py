"""The offline demo: the project's whole job, small, on real handwriting (configs/demo.py).

`run` builds the digit-scene dataset (data/demo.py) on first use, pretrains a small model on the
scene labels with the classification trainer, finetunes the frozen-backbone segmentation head on the
masks with the segmentation trainer, draws GAug kernels and attention maps, and reports top-1 and
mIoU, and the pretrained backbone's Hummingbird mIoU (nearest-neighbour label transfer from the
training scenes' patch features: a dense measure with no trained head). `compare` does that for
several variants and seeds and writes a table and a bar chart. Both trainers and the evaluator are the
ones ImageNet, ADE20K and Pascal VOC use: only the configs differ.
"""

from __future__ import annotations

import copy
import json
import statistics

import jax
import numpy as np
from absl import logging

from locatvit_jax import loading, paths, sharding, viz
from locatvit_jax.data import demo as demo_data
from locatvit_jax.data import sources, transforms
from locatvit_jax import evaluators
from locatvit_jax.models import registry
from locatvit_jax.train import classification, segmentation
from locatvit_jax.train import evaluate as evaluate_task

VARIANT_NAMES = {'vit': 'ViT', 'gaug': 'GAug only', 'prr': 'PRR only', 'locat': 'LocAtViT'}
# The measures of a run: key in its row -> column title (all in percent).
MEASURES = {'top1': 'top-1 (%)', 'miou': 'mIoU (%)', 'hbird_miou': 'Hummingbird mIoU (%)'}


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
  pre.model.update(registry.variant_overrides(pre.model_name, variant))
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
  hbird = hummingbird_miou(config, dataset, workdir)
  return {'variant': variant, 'seed': seed, 'top1': cls['eval_top1'], 'miou': segm['miou'], 'hbird_miou': hbird}


def hummingbird_miou(config, dataset: str, workdir: str) -> float:
  """Hummingbird mIoU of the pretrained backbone on the scenes' masks; measured once (as task='evaluate'
  writes it: workdir/evals/hummingbird_step0.json, per-class IoU included), then read back."""
  result_file = evaluators.result_path(workdir, 'hummingbird', 0)
  if result_file.exists():
    return json.loads(paths.read_text(result_file))['metrics']['miou']
  cfg = copy.deepcopy(config.hummingbird)
  cfg.data.update(dict(name=dataset, data_dir=_data_dir(config)))
  mesh = sharding.make_mesh(config.pretrain.mesh)
  evaluator = evaluators.make_evaluator('hummingbird', cfg, mesh)
  model = evaluate_task.on_mesh(loading.load(paths.path(workdir) / 'pretrain' / 'export'), mesh)
  return evaluators.Runner([evaluator], workdir).evaluate(model, 0)['hummingbird/miou']


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
        f'mIoU {100 * result["miou"]:.2f}%  Hummingbird mIoU {100 * result["hbird_miou"]:.2f}%', flush=True)
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
        VARIANT_NAMES[v]: {title: [100 * r[key] for r in rows if r['variant'] == v] for key, title in MEASURES.items()}
        for v in table}, title='Digit scenes: mean and std over seeds')
    print(text, flush=True)
  return {'rows': rows, 'table': table}


def summarize(rows: list[dict]) -> dict:
  """variant -> {measure: (mean, std) for each of MEASURES, 'n'} in percent."""
  table = {}
  for variant in dict.fromkeys(r['variant'] for r in rows):
    mine = [r for r in rows if r['variant'] == variant]
    stats = {}
    for key in MEASURES:
      vals = [100 * r[key] for r in mine]
      stats[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    table[variant] = {**stats, 'n': len(mine)}
  return table


def compare_markdown(table: dict, config) -> str:
  lines = ['| model | ' + ' | '.join(MEASURES.values()) + ' | seeds |', '|---' * (len(MEASURES) + 2) + '|']
  for variant, s in table.items():
    cells = ' | '.join(f'{s[key][0]:.2f} ± {s[key][1]:.2f}' for key in MEASURES)
    lines.append(f'| {VARIANT_NAMES[variant]} | {cells} | {s["n"]} |')
  seeds = ','.join(str(s) for s in config.compare.seeds)
  lines.append('')
  lines.append(f'Mean ± standard deviation over seeds {seeds}; digit scenes {config.data.image_size} px, '
               f'{config.data.num_train} train / {config.data.num_val} validation scenes.')
  return '\n'.join(lines) + '\n'
