"""Multi-host segmentation evaluation: two processes on loopback, each with its own 2 fake CPU devices and
the params sharded over all 4, score the confusion matrix that one process scores, though their shares
of the images differ in number and sizes (and one holds a corrupt file).

This file is also the worker: `python tests/test_seg_multihost.py PORT PROCESS_ID EXPORT DATA_ROOT OUT_JSON`.
"""

import json
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import locatvit_jax
from locatvit_jax import checkpoint, loading, sharding
from locatvit_jax.data import seg_sources
from locatvit_jax.evaluators import segmentation as seg_eval
from locatvit_jax.models import seg_head
from locatvit_jax.train import segmentation


def write_random_export(path):
  """A segmentation export of random params, made from shapes alone: no JAX computation to compile,
  which costs most in the workers (every eager op compiles, slowly with several processes)."""
  rng = np.random.default_rng(0)
  fill = lambda tree: jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(a.dtype), tree)
  backbone = nnx.eval_shape(lambda: locatvit_jax.create_model(
      'locatvit_ti16', num_classes=4, img_size=32, width=32, depth=2, num_heads=2, mlp_dim=64))
  head = nnx.eval_shape(lambda: seg_head.SegHead(32, 150, hidden=16, rngs=nnx.Rngs(0)))
  params = {'backbone': fill(loading.get_params(backbone)), 'head': fill(loading.params_dict(nnx.state(head, nnx.Param)))}
  config = ml_collections.ConfigDict(dict(init='random', data=dict(num_classes=150), head_hidden=16))
  checkpoint.save_params(path, params, ml_collections.ConfigDict(segmentation.head_config(config, backbone.cfg)))
  return path


def evaluate(export, data_root) -> tuple[np.ndarray, dict]:
  """(the confusion matrix over all processes, evaluate's result) of the export, its params sharded over
  every device as the trainer's are (fsdp: kernels split across the processes)."""
  backbone, head = segmentation.load_export(export)
  bb_graphdef, bb_params, bb_rest = nnx.split(backbone, nnx.Param, ...)
  head_graphdef, head_params = nnx.split(head, nnx.Param)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
  # From host values, shard by shard: jax.device_put would check and compile leaf by leaf.
  on_mesh = lambda tree: jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, np.asarray(x).__getitem__),
                                      tree, sharding.tree_shardings(tree, mesh))
  config = ml_collections.ConfigDict(dict(data=dict(kind='ade20k', root=str(data_root), num_classes=150),
                                          eval_scale=(64, 32), patch_size=16))
  source = seg_sources.segmentation_source(config.data, 'validation')
  confusion = []
  metrics = seg_eval.segmentation_metrics
  seg_eval.segmentation_metrics = lambda conf: confusion.append(conf) or metrics(conf)
  try:
    result = segmentation.evaluate(segmentation.make_predict(bb_graphdef, head_graphdef), on_mesh(head_params),
                                   on_mesh(bb_params), bb_rest, config, source)
  finally:
    seg_eval.segmentation_metrics = metrics
  return confusion[0], result


def test_two_processes_score_what_one_does(tmp_path):
  from tests.conftest import REPO, subprocess_env
  from tests.test_train_segmentation import CORRUPT, write_colour_ade20k

  # 7 validation files of 5 sizes, ADE_3 corrupt: the processes get files 0, 2, 4, 6 and 1, 3, 5,
  # and score 4 and 2 images.
  assert CORRUPT[-1] == 'images/validation/ADE_3.jpg'
  root = write_colour_ade20k(tmp_path / 'ade', per_split=(0, 7))
  export = write_random_export(tmp_path / 'export')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(subprocess_env(devices=2), PYTHONPATH=str(REPO))
  procs = [subprocess.Popen([sys.executable, __file__, str(port), str(i), str(export), str(root),
                             str(tmp_path / f'p{i}.json')],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    conf, result = evaluate(export, root)  # meanwhile, in one process (this one, 8 devices)
    for p in procs:
      out, _ = p.communicate(timeout=120)  # a hang fails the test instead of stalling the suite
      assert p.returncode == 0, out[-3000:]
  finally:
    for p in procs:
      p.kill()
  assert result['eval_skipped'] == 1
  assert np.count_nonzero(conf.sum(0)) > 1  # the predictions vary: a real comparison
  for i in range(2):
    got = json.loads((tmp_path / f'p{i}.json').read_text())
    # Every labelled pixel counted once: the pixels per class (row sums) depend on the labels alone.
    np.testing.assert_array_equal(np.sum(got['confusion'], 1), conf.sum(1))
    # The predictions alike; equal here, but XLA flags may differ between this process and the
    # workers, and a last-bit difference may flip the argmax of a pixel where two logits tie.
    assert np.abs(np.array(got['confusion']) - conf).sum() <= 1e-4 * conf.sum()
    assert got['miou'] == pytest.approx(result['miou'], abs=1e-3) and got['eval_skipped'] == 1


if __name__ == '__main__':
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # Grain reads absl flags
  port, process_id, export, data_root, out = sys.argv[1:]
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id))
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  conf, result = evaluate(export, data_root)
  with open(out, 'w') as f:
    json.dump({'confusion': conf.tolist(), 'miou': result['miou'], 'eval_skipped': result['eval_skipped']}, f)
  jax.distributed.shutdown()
