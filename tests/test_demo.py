"""The README's demo job, end to end at a tiny size: build data, pretrain, finetune, pictures, compare."""

import json

import numpy as np
import pytest

from locatvit_jax import demo
from locatvit_jax import main as entry
from locatvit_jax import metrics, paths, sharding
from locatvit_jax.configs import demo as demo_config


def tiny_demo_config(data_dir, mode=None):
  c = demo_config.get_config(mode)
  c.data.update(dict(data_dir=str(data_dir), image_size=32, num_train=64, num_val=16))
  c.pretrain.model.update(dict(img_size=32, width=32, depth=2, num_heads=2, mlp_dim=64))
  c.pretrain.aug.eval_resize = 32
  c.pretrain.batch_size = c.pretrain.eval_batch_size = 16
  c.pretrain.epochs, c.pretrain.warmup_steps = 1, 1
  c.pretrain.log_every = 2
  c.finetune.crop_size = 32
  c.finetune.train_scale = c.finetune.eval_scale = (32, 32)
  c.finetune.batch_size, c.finetune.total_steps, c.finetune.head_hidden = 8, 3, 16
  c.finetune.log_every, c.finetune.checkpoint_every, c.finetune.num_pictures = 1, 3, 2
  c.num_pictures = 1
  c.picture_layers = (0, 1)
  c.picture_queries = ((0, 0), (2, 3))
  c.compare.update(dict(variants=('vit', 'locat'), seeds=(0,)))
  c.hummingbird.update(dict(image_size=32, batch_size=16, num_train_images=32, memory_size=256, num_val_images=16))
  return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('demo_data')


def test_demo_on_a_gs_workdir_reports_top1_and_miou_and_draws(gcs_dir, data_dir, capsys):
  result = entry.run(tiny_demo_config(data_dir), gcs_dir)
  assert all(0.0 <= result[key] <= 1.0 for key in ('top1', 'miou', 'hbird_miou'))
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last == (f'DEMO RESULT (LocAtViT): top-1 {100 * result["top1"]:.2f}%  mIoU {100 * result["miou"]:.2f}%  '
                  f'Hummingbird mIoU {100 * result["hbird_miou"]:.2f}%')
  hbird = json.loads(paths.read_text(f'{gcs_dir}/evals/hummingbird_step0.json'))['metrics']
  assert hbird['miou'] == result['hbird_miou'] and len(hbird['per_class_iou']) == 11  # background + 10 digits
  for name in ('gaug_kernels_0.png', 'attention_0.png', 'segment/segmentation_step3.png'):
    assert paths.read_bytes(f'{gcs_dir}/{name}')[:4] == b'\x89PNG', name
  for stage in ('pretrain', 'segment'):
    assert metrics.read_metrics(f'{gcs_dir}/{stage}'), stage
  assert paths.path(f'{gcs_dir}/pretrain/export/model_config.json').exists()


def test_compare_writes_table_and_chart_and_a_rerun_trains_nothing(tmp_path, data_dir, monkeypatch):
  out = entry.run(tiny_demo_config(data_dir, 'compare'), str(tmp_path))
  rows = json.loads((tmp_path / 'compare.json').read_text())
  assert [(r['variant'], r['seed']) for r in rows] == [('vit', 0), ('locat', 0)]
  table = (tmp_path / 'compare.md').read_text()
  header = '| model | top-1 (%) | mIoU (%) | Hummingbird mIoU (%) | seeds |\n|---|---|---|---|---|\n'
  assert table.startswith(header)
  for variant in ('ViT', 'LocAtViT'):
    s = out['table']['vit' if variant == 'ViT' else 'locat']
    # one seed: no spread
    cells = ' | '.join(f'{s[key][0]:.2f} ± 0.00' for key in ('top1', 'miou', 'hbird_miou'))
    assert f'| {variant} | {cells} | 1 |' in table
  assert (tmp_path / 'compare.png').stat().st_size > 0
  # A rerun (e.g. after a crash in the last run) reads every finished run back instead of training.
  (tmp_path / 'compare.json').unlink()
  monkeypatch.setattr(sharding, 'to_global', lambda *a: pytest.fail('a finished run fed a batch to the devices'))
  again = entry.run(tiny_demo_config(data_dir, 'compare'), str(tmp_path))
  assert again['rows'] == out['rows'] and json.loads((tmp_path / 'compare.json').read_text()) == rows


def test_summary_is_mean_and_sample_std_over_seeds():
  rows = [{'variant': 'vit', 'seed': s, 'top1': t, 'miou': m, 'hbird_miou': h}
          for s, t, m, h in [(0, 0.4, 0.1, 0.3), (1, 0.6, 0.2, 0.3), (2, 0.8, 0.6, 0.6)]]
  table = demo.summarize(rows + [{'variant': 'locat', 'seed': 0, 'top1': 0.9, 'miou': 0.3, 'hbird_miou': 0.5}])
  assert table['vit']['n'] == 3 and table['locat']['n'] == 1
  np.testing.assert_allclose(table['vit']['top1'], (60.0, 20.0))  # sample std (n - 1), in percent
  np.testing.assert_allclose(table['vit']['miou'], (30.0, np.std([10, 20, 60], ddof=1)))
  np.testing.assert_allclose(table['vit']['hbird_miou'], (40.0, np.std([30, 30, 60], ddof=1)))
  assert table['locat']['top1'] == (90.0, 0.0) and table['locat']['hbird_miou'] == (50.0, 0.0)
