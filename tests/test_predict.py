"""locatvit_jax.preprocess (the trainer's evaluation transform) and `python -m locatvit_jax.predict`."""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import locatvit_jax
from locatvit_jax import checkpoint, predict
from locatvit_jax.data import pipeline, sources
from locatvit_jax.train import classification
from tests import test_loading
from tests.conftest import REPO, tiny_classification_config

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
NAMES = ['red fox', 'dog', 'goldfish', 'bird']  # a space, as in real class names


def tiny_model(num_classes=4, **kw):
  return locatvit_jax.create_model('locatvit_ti16', num_classes=num_classes, **{**TINY, **kw}, seed=3)


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  """Noise images (every resampling difference shows) of odd sizes: RGB, greyscale, RGBA; in an image folder."""
  folder = tmp_path_factory.mktemp('images') / 'some_class'
  folder.mkdir()
  rng = np.random.default_rng(0)
  shapes = {'a_rgb.png': (257, 301, 3), 'b_grey.png': (263, 199), 'c_rgba.png': (333, 520, 4)}
  for name, shape in shapes.items():
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
  return sorted(folder.iterdir())


@pytest.fixture(scope='module')
def export(tmp_path_factory):
  model = tiny_model(img_size=32)
  path = tmp_path_factory.mktemp('export')
  checkpoint.save_params(path, locatvit_jax.get_params(model), model.cfg, class_names=NAMES)
  return path


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'locatvit_jax.predict', *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def expected_lines(model, files, names, top):
  """What the CLI should print, computed here in the test's own way (eagerly; the CLI compiles)."""
  probs = np.asarray(jax.nn.softmax(model(locatvit_jax.preprocess([Image.open(f) for f in files], model))))
  lines = []
  for f, p in zip(files, probs):
    lines.append(str(f))
    lines += [f'  {p[c]:.4f}  {names[c] if names else c}' for c in np.argsort(-p)[:top]]
  return lines


def assert_printed(lines, want, tol=2e-4):
  """The same lines, probabilities equal to print rounding (eager and compiled float32 may differ in the last bit)."""
  assert len(lines) == len(want), (lines, want)
  for got, expected in zip(lines, want):
    if expected.startswith('  '):  # '  0.1234  name'
      assert got[10:] == expected[10:]
      assert float(got.split()[0]) == pytest.approx(float(expected.split()[0]), abs=tol)
    else:
      assert got == expected


# -- preprocess --------------------------------------------------------------------------------------
def test_preprocess_is_the_eval_pipeline_bit_for_bit(image_files):
  model = tiny_model()  # 224 px: the recipe's own eval_resize (248) applies unchanged
  source = sources.ImageFolderSource(str(image_files[0].parent.parent))
  loader = pipeline.classification_loader(source, train=False, global_batch_size=3, img_size=224,
                                          aug=pipeline.default_aug_config(), seed=0, worker_count=0,
                                          shard_index=0, shard_count=1)
  (batch,) = list(loader)
  assert batch['valid'].tolist() == [1, 1, 1]
  pictures = [Image.open(f) for f in image_files]
  assert [p.mode for p in pictures] == ['RGB', 'L', 'RGBA']
  got = locatvit_jax.preprocess(pictures, model)
  assert got.dtype == np.float32 and got.shape == (3, 224, 224, 3)
  np.testing.assert_array_equal(got, batch['image'])
  # uint8 arrays, one at a time: (H, W, 3), (H, W) and (H, W, 4).
  for i, picture in enumerate(pictures):
    np.testing.assert_array_equal(locatvit_jax.preprocess(np.asarray(picture), model), batch['image'][i:i + 1])


def test_other_sizes_keep_the_recipes_crop_fraction():
  assert predict.eval_resize(224) == pipeline.default_aug_config().eval_resize == 248
  assert predict.eval_resize(384) == 425  # floor(384 * 248 / 224)
  x = locatvit_jax.preprocess(np.zeros((50, 70, 3), np.uint8), tiny_model(img_size=32))
  assert x.shape == (1, 32, 32, 3) and np.all(x == -1.0)  # black through mean = std = 0.5


@pytest.mark.parametrize('images, match', [
    ([], 'no images given'),
    (np.zeros((8, 8, 3), np.float32), 'dtype float32; expected uint8'),
    (np.zeros((2, 8, 8, 3), np.uint8), r'shape \(2, 8, 8, 3\)'),
])
def test_preprocess_rejects_what_it_cannot_read(images, match):
  with pytest.raises(ValueError, match=match):
    locatvit_jax.preprocess(images, tiny_model(img_size=32))


# -- the command line ----------------------------------------------------------------------------------
def test_cli_prints_top_classes_with_names_and_draws_pictures(export, image_files, tmp_path):
  done = run_cli(f'--init={export}', *image_files, '--top=3', f'--pictures={tmp_path}')
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  printed = [l for l in lines if not l.startswith('  saved ')]
  assert len(printed) == 3 * (1 + 3)
  assert_printed(printed, expected_lines(locatvit_jax.load(export), image_files, NAMES, 3))
  for block in range(3):
    probs = [float(l.split()[0]) for l in printed[4 * block + 1:4 * block + 4]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0
  saved = [l.removeprefix('  saved ') for l in lines if l.startswith('  saved ')]
  stems = [f'{i}_{f.stem}' for i, f in enumerate(image_files)]
  assert saved == [str(tmp_path / f'{s}_{kind}.png') for s in stems for kind in ('gaug_kernels', 'attention')]
  for path in saved:
    with Image.open(path) as picture:
      assert picture.format == 'PNG' and min(picture.size) > 100


def test_thousand_classes_print_imagenet_names(tmp_path, image_files, capsys):
  names = predict.imagenet_class_names()
  assert len(names) == 1000 and names[0] == 'tench, Tinca tinca' and names[999].startswith('toilet tissue')
  model = tiny_model(num_classes=1000, img_size=32)
  params = locatvit_jax.get_params(model)
  # A random head makes 1000 near-equal probabilities; these biases make the top two certain.
  params['head']['bias'] = np.zeros(1000, np.float32)
  params['head']['bias'][[1, 2]] = (9.0, 8.0)
  checkpoint.save_params(tmp_path, params, model.cfg)
  assert predict.main([f'--init={tmp_path}', str(image_files[0]), '--top=2']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [l[10:] for l in lines[1:]] == ['goldfish, Carassius auratus', names[2]]
  assert_printed(lines, expected_lines(locatvit_jax.load(tmp_path), image_files[:1], names, 2))


def test_without_names_prints_class_indices(export, image_files, tmp_path, capsys):
  shutil.copytree(export, tmp_path / 'export')
  (tmp_path / 'export' / checkpoint.CLASS_NAMES_FILE).unlink()
  assert predict.main([f'--init={tmp_path / "export"}', str(image_files[1]), '--top=10']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert sorted(l[10:] for l in lines[1:]) == ['0', '1', '2', '3']  # --top beyond the classes prints them all
  assert_printed(lines, expected_lines(locatvit_jax.load(export), image_files[1:2], None, 4))


def test_trainer_exports_name_the_folder_classes(image_folder, tmp_path):
  config = tiny_classification_config(str(image_folder), total_steps=1, warmup_steps=0, export_best=True)
  classification.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  for export in ('export', 'export_best'):
    written = (tmp_path / export / checkpoint.CLASS_NAMES_FILE).read_text()
    assert written == ''.join(f'class_{c}\n' for c in range(4)), export
  assert predict.class_names(tmp_path / 'export', 4) == [f'class_{c}' for c in range(4)]


def test_cli_flags_state_what_the_checkpoint_cannot_tell(tmp_path, image_files, capsys, monkeypatch):
  """--prr for a state dict without config.json; --trust-pickle and --ema for the authors' training checkpoints."""
  model = tiny_model(img_size=32)
  bare = test_loading.write_timm(tmp_path / 'model.safetensors', model)
  monkeypatch.setitem(sys.modules, 'torch', test_loading.fake_torch())
  ckpt = test_loading.write_torch(tmp_path / 'model_best.pth.tar',
                                  test_loading.training_checkpoint(model, test_loading.train_args(model.cfg)))
  image = str(image_files[0])
  for init, hint in ((bare, '--prr=true'), (ckpt, '--trust-pickle')):
    assert predict.main([f'--init={init}', image]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {init}') and err.count('\n') == 1 and hint in err, err
  # The EMA weights are the weights + 1 (test_loading.training_checkpoint): logits near 33, where eager
  # and compiled float32 differ by ~1e-4 relative (6e-4 in a probability on some CPUs); the regular
  # weights' probabilities differ from the EMA ones' by ~0.1, so 2e-3 still tells them apart.
  for init, flags, load_args, tol in ((bare, ['--prr=true'], dict(prr=True), 2e-4),
                                      (ckpt, ['--trust-pickle', '--ema'], dict(trust_pickle=True, ema=True), 2e-3)):
    assert predict.main([f'--init={init}', *flags, image, '--top=2']) == 0
    want = expected_lines(locatvit_jax.load(init, **load_args), image_files[:1], None, 2)
    assert_printed(capsys.readouterr().out.splitlines(), want, tol)


def bad_inputs(tmp_path, export, image):
  (tmp_path / 'not_an_image.jpg').write_bytes(b'plain text')
  (tmp_path / 'truncated.png').write_bytes(image.read_bytes()[:300])
  (tmp_path / 'corrupt.safetensors').write_bytes(b'garbage')
  shutil.copytree(export, tmp_path / 'wrong_names')
  (tmp_path / 'wrong_names' / checkpoint.CLASS_NAMES_FILE).write_text('cat\ndog\n')
  return {
      'missing image': ([f'--init={export}', tmp_path / 'missing.png'], 'missing.png: no such file'),
      'not an image': ([f'--init={export}', tmp_path / 'not_an_image.jpg'], 'not an image'),
      'truncated image': ([f'--init={export}', tmp_path / 'truncated.png'], 'truncated'),
      'missing checkpoint': ([f'--init={tmp_path / "nothing"}', image], 'no such file or directory'),
      'not a checkpoint': ([f'--init={tmp_path}', image], 'found neither params/'),
      'corrupt safetensors': ([f'--init={tmp_path / "corrupt.safetensors"}', image], 'not a readable .safetensors'),
      'wrong class names': ([f'--init={tmp_path / "wrong_names"}', image], 'has 2 lines but the model has 4 classes'),
      'top 0': ([f'--init={export}', image, '--top=0'], '--top=0; expected at least 1'),
  }


def test_bad_inputs_give_one_error_line_and_status_2(export, image_files, tmp_path, capsys):
  for case, (argv, message) in bad_inputs(tmp_path, export, image_files[0]).items():
    assert predict.main(list(map(str, argv))) == 2, case
    out, err = capsys.readouterr()
    assert out == '', case
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err, (case, err)


def test_bad_input_through_the_command_line(export, tmp_path):
  done = run_cli(f'--init={export}', tmp_path / 'missing.png')
  assert done.returncode == 2 and done.stdout == ''
  assert done.stderr == f'error: {tmp_path / "missing.png"}: no such file\n'
