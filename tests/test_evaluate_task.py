"""Evaluators by config: periodic k-NN and linear probe in a classification run, and task='evaluate'
on our export and on the authors' checkpoint converted to ours."""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import locatvit_jax
from locatvit_jax import metrics
from locatvit_jax.configs import evaluate as evaluate_config
from locatvit_jax.data import pipeline, sources
from locatvit_jax.train import classification, evaluate
from tests.conftest import REPO, subprocess_env, tiny_classification_config
from tests.test_knn import numpy_knn

TINY_DATA = dict(img_size=32, eval_resize=36, worker_count=0)


def tiny_evals(root, knn_every=3):
  data = dict(kind='folder', root=str(root), **TINY_DATA)
  return ml_collections.ConfigDict(dict(
      knn=dict(type='knn', every=knn_every, data=data, ks=(1, 5, 10), batch_size=8),
      lin=dict(type='linear_probe', every=0, data=data, epochs=5, lr=0.1, lr_base_batch=8,
               probe_batch_size=8, batch_size=8)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, image_folder):
  """6 steps with k-NN every 3 steps and a linear probe at the end."""
  workdir = tmp_path_factory.mktemp('with_evals')
  config = tiny_classification_config(str(image_folder))
  config.log_every = 4  # the evaluators' steps must be logged on their own
  config.evals = tiny_evals(image_folder)
  result = classification.train_and_evaluate(config, str(workdir))
  return workdir, result


def test_classification_run_logs_both_evaluators_at_their_steps(trained):
  workdir, result = trained
  rows = {r['step']: r for r in metrics.read_metrics(workdir)}
  knn_keys = {'knn/top1_k1', 'knn/top1_k5', 'knn/top1_k10', 'knn/memory_size', 'knn/queries'}
  lin_keys = {'lin/top1', 'lin/train_loss', 'lin/train_examples'}
  assert knn_keys <= rows[3].keys() and not lin_keys & rows[3].keys()
  assert knn_keys | lin_keys <= rows[6].keys()
  assert rows[6]['knn/memory_size'] == 24 and rows[6]['knn/queries'] == 24 and rows[6]['lin/train_examples'] == 24
  assert 'knn/top1_k1' not in rows[4]
  for name, step in (('knn', 3), ('knn', 6), ('lin', 6)):
    record = json.loads((workdir / 'evals' / f'{name}_step{step}.json').read_text())
    assert record['step'] == step and record['name'] == name
    for metric, value in record['metrics'].items():
      assert rows[step][f'{name}/{metric}'] == pytest.approx(value)
  assert sorted(p.name for p in (workdir / 'evals').iterdir()) == ['knn_step3.json', 'knn_step6.json',
                                                                   'lin_step6.json']
  assert result['knn/top1_k1'] == rows[6]['knn/top1_k1']


def loader_features(model, image_folder):
  """pooled_features of the evaluation images, computed directly (no evaluator code)."""
  out = {}
  for split in ('train', 'val'):
    source = sources.image_folder_source(str(image_folder / split))
    aug = pipeline.default_aug_config()
    aug.eval_resize = 36
    batches = list(pipeline.classification_loader(source, train=False, global_batch_size=8, img_size=32, aug=aug,
                                                  seed=0, worker_count=0))
    images = np.concatenate([b['image'] for b in batches])
    valid = np.concatenate([b['valid'] for b in batches]).astype(bool)
    labels = np.concatenate([b['label'] for b in batches])
    out[split] = (np.asarray(model.pooled_features(images))[valid], labels[valid])
  return out


def knn_config(init, image_folder, **fields):
  config = evaluate_config.get_config('knn')
  config.init = str(init)
  config.imagenet_root = str(image_folder)
  config.img_size, config.eval_resize, config.worker_count = 32, 36, 0
  config.evals.knn.ks = (1, 5, 10)
  config.evals.knn.batch_size = 8
  for k, v in fields.items():
    config[k] = v
  return config


def test_evaluate_task_on_our_export_equals_numpy_knn(trained, image_folder, tmp_path):
  workdir, _ = trained
  result = evaluate.run(knn_config(workdir / 'export', image_folder), str(tmp_path))
  feats = loader_features(locatvit_jax.load(workdir / 'export'), image_folder)
  for k in (1, 5, 10):
    top1, top5, _, _ = numpy_knn(*feats['train'], *feats['val'], k, 0.07, 4)
    assert result[f'knn/top1_k{k}'] == pytest.approx(top1), k
  assert 'knn/top5_k1' not in result  # 4 classes: no top-5
  rows = metrics.read_metrics(tmp_path)
  assert [r['step'] for r in rows] == [0] and rows[0]['knn/top1_k5'] == result['knn/top1_k5']
  assert json.loads((tmp_path / 'evals' / 'knn_step0.json').read_text())['metrics']['top1_k10'] == \
      result['knn/top1_k10']


@pytest.fixture(scope='module')
def converted(parity_dir, tmp_path_factory):
  """The authors' LocAtViT-Ti (random weights) converted to our params export."""
  from locatvit_jax import convert
  out = tmp_path_factory.mktemp('converted') / 'export'
  convert.to_orbax(str(parity_dir), str(out))
  return out


def test_evaluate_command_on_the_converted_authors_checkpoint(converted, parity_dir, image_folder, tmp_path):
  """The command line on the converted checkpoint gives what evaluating the authors' files gives."""
  flags = [f'--config.init={converted}', f'--config.imagenet_root={image_folder}', '--config.img_size=32',
           '--config.eval_resize=36', '--config.worker_count=0', '--config.evals.knn.ks=(1,5,10)',
           '--config.evals.knn.batch_size=8', '--config.evals.linear_probe.batch_size=8',
           '--config.evals.linear_probe.probe_batch_size=8', '--config.evals.linear_probe.epochs=3']
  cmd = [sys.executable, '-m', 'locatvit_jax.main', '--config=configs/evaluate.py:knn,linear_probe',
         f'--workdir={tmp_path / "w"}', *flags]
  out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(devices=2), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  final = json.loads(next(l for l in out.stdout.splitlines() if l.startswith('Final metrics: '))[15:])
  assert {'knn/top1_k1', 'knn/top1_k10', 'linear_probe/top1', 'linear_probe/train_loss'} <= final.keys()
  assert sorted(p.name for p in (tmp_path / 'w' / 'evals').iterdir()) == ['knn_step0.json',
                                                                         'linear_probe_step0.json']
  # The authors' own files, in this process on 8 devices: the same neighbours, so the same k-NN.
  direct = evaluate.run(knn_config(parity_dir, image_folder), str(tmp_path / 'direct'))
  for k in (1, 5, 10):
    assert direct[f'knn/top1_k{k}'] == final[f'knn/top1_k{k}']


@pytest.mark.parametrize('flags, message', [
    (['--config.evals.knn.type=knnn'],
     "error: config.evals.knn.type='knnn'; expected one of ('knn', 'linear_probe', 'hummingbird')"),
    ([], "error: config.evals.knn.data: data.kind='folder' needs data.root"),  # no imagenet_root
    (['--config.init='], 'error: config.init is empty; expected a checkpoint to evaluate'),
])
def test_bad_config_is_one_error_line_before_any_work(converted, flags, message, tmp_path):
  cmd = [sys.executable, '-m', 'locatvit_jax.main', '--config=configs/evaluate.py:knn', f'--workdir={tmp_path / "w"}',
         f'--config.init={converted}', *flags]
  out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith(message), out.stderr[-2000:]
  assert not (tmp_path / 'w').exists()


def test_unknown_evaluator_argument_of_the_packaged_config():
  with pytest.raises(ValueError, match=r"config argument 'knn,hb'; expected evaluators among"):
    evaluate_config.get_config('knn,hb')
