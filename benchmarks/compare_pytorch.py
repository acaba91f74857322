r"""Our train step next to the authors' PyTorch LocAtViT and timm's plain ViT, in one session.

  python -m benchmarks.compare_pytorch --setup=/tmp/locat_torch   # once: venv + the authors' code
  python -m benchmarks.compare_pytorch --setup=/tmp/locat_torch --out=/tmp/compare.md

--setup=DIR holds the scratch PyTorch side, made on first use and never part of this repository:
DIR/venv (`torch`, `timm==1.0.19`, `huggingface_hub`, installed by pip from whatever index pip is
configured with) and DIR/LocAtViT (github sinahmr/LocAtViT at AUTHORS_COMMIT, cloned from
--authors_url, which may also be a local clone). The authors' `models/vit.py` registers
`locatvit_tiny` with timm; the script imports it from that checkout.

For each --sizes entry SIZE:BATCH it runs, one after another and alternating the order each
--rounds round (so that drift in the machine's load hits every row alike):
- ours: `benchmarks/train_step.py --pair` (LocAtViT and our plain ViT, the trainer's own jitted step:
  mixup, drop path, AdamW), under the fast CPU environment as `locatvit_jax.main` runs;
- the authors' `locatvit_tiny` and timm's `vit_tiny_patch16_224` (same `img_size`), float32, train
  mode with the same drop path as ours, soft-target cross-entropy, AdamW: forward, backward and
  optimizer step, with torch using every core.
Each row is the median step over --steps timed steps after --warmup; the table reports img/s and
our speed relative to each PyTorch model. Every number printed by a worker is also kept as JSON
lines in --out with a .jsonl suffix.

The PyTorch worker is this same file run by the scratch venv's python (`--worker=torch`): it needs
only the standard library at the top, so it imports nothing of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

AUTHORS_URL = 'https://github.com/sinahmr/LocAtViT'
AUTHORS_COMMIT = 'f99aac4'  # the code whose outputs tests/test_model.py compares against
TORCH_PACKAGES = ('torch', 'timm==1.0.19', 'huggingface_hub')
REPO = pathlib.Path(__file__).resolve().parents[1]
DROP_PATH_TI = 0.1  # locatvit_jax.models.vit.SIZES['ti']: the PyTorch models train with the same


def parse_sizes(text: str) -> list[tuple[int, int]]:
  sizes = []
  for item in text.split(','):
    size, sep, batch = item.partition(':')
    if not (sep and size.isdigit() and batch.isdigit() and int(size) % 16 == 0 and int(batch) > 0):
      raise ValueError(f'--sizes item {item!r}; expected SIZE:BATCH with SIZE a multiple of 16, e.g. 224:32')
    sizes.append((int(size), int(batch)))
  return sizes


# -- the PyTorch side (runs under the scratch venv) --------------------------------------------------
def torch_worker(args) -> None:
  import torch
  import timm
  sys.path.insert(0, args.authors)
  import models.vit  # noqa: F401  (the authors' code: registers locatvit_tiny with timm)

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  name = {'authors_locatvit': 'locatvit_tiny', 'timm_vit': 'vit_tiny_patch16_224'}[args.model]
  model = timm.create_model(name, num_classes=1000, img_size=args.size, drop_path_rate=DROP_PATH_TI)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  images = torch.randn(args.batch, 3, args.size, args.size)
  targets = torch.nn.functional.one_hot(torch.randint(0, 1000, (args.batch,)), 1000).float()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.sum(-targets * torch.log_softmax(model(images), dim=-1), dim=-1).mean()
    loss.backward()
    optimizer.step()

  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  print(json.dumps({'model': args.model, 'timm_name': name, 'size': args.size, 'batch': args.batch,
                    'step_ms': round(step_s * 1e3, 2), 'img_per_s': round(args.batch / step_s, 3),
                    'torch': torch.__version__, 'timm': timm.__version__, 'threads': torch.get_num_threads()}),
        flush=True)


# -- the driver (runs under the project's python) ----------------------------------------------------
def setup(root: pathlib.Path, authors_url: str) -> tuple[pathlib.Path, pathlib.Path]:
  """The scratch venv's python and the authors' checkout, made if missing."""
  python, authors = root / 'venv' / 'bin' / 'python', root / 'LocAtViT'
  if not python.exists():
    subprocess.run([sys.executable, '-m', 'venv', str(root / 'venv')], check=True)
    subprocess.run([str(python), '-m', 'pip', 'install', '-q', *TORCH_PACKAGES], check=True)
  if not (authors / 'models' / 'vit.py').exists():
    subprocess.run(['git', 'clone', '-q', authors_url, str(authors)], check=True)
    subprocess.run(['git', '-C', str(authors), 'checkout', '-q', AUTHORS_COMMIT], check=True)
  return python, authors


def last_json(cmd: list[str], env: dict | None = None) -> dict:
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
  if done.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd[:4])} ... exited {done.returncode}:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def load() -> str:
  return ' '.join(pathlib.Path('/proc/loadavg').read_text().split()[:3]) if os.path.exists('/proc/loadavg') else '?'


def run_ours(size: int, batch: int, args) -> dict:
  return last_json([sys.executable, '-m', 'benchmarks.train_step', '--model=locatvit_ti16', f'--size={size}',
                    f'--batch={batch}', f'--steps={args.steps}', f'--warmup={args.warmup}', '--pair',
                    *shlex.split(args.ours_flags)])


def run_torch(model: str, size: int, batch: int, python: pathlib.Path, authors: pathlib.Path, args) -> dict:
  return last_json([str(python), str(pathlib.Path(__file__).resolve()), '--worker=torch', f'--model={model}',
                    f'--size={size}', f'--batch={batch}', f'--steps={args.steps}', f'--warmup={args.warmup}',
                    f'--authors={authors}'])


def table(rows: list[dict], header: str) -> str:
  lines = [header, '',
           '| size, batch | authors\' LocAtViT-Ti (PyTorch) | timm ViT-Ti | our LocAtViT-Ti | our ViT-Ti '
           '| ours / authors | ours / timm ViT | our GAug+PRR cost |',
           '|---|---|---|---|---|---|---|---|']
  for (size, batch) in sorted({(r['size'], r['batch']) for r in rows}):
    def med(kind, key='img_per_s'):
      vals = [r[key] for r in rows if r['kind'] == kind and r['size'] == size and r['batch'] == batch]
      return statistics.median(vals) if vals else float('nan')
    ours, authors, timm_vit = med('ours'), med('authors_locatvit'), med('timm_vit')
    lines.append(f'| {size}, {batch} | {authors:.2f} | {timm_vit:.2f} | {ours:.2f} | {med("ours_vit"):.2f} '
                 f'| **{ours / authors:.2f}x** | {ours / timm_vit:.2f}x | {med("ours", "ratio"):.3f} |')
  lines += ['', 'img/s, medians over rounds of the median step; "our GAug+PRR cost" = our LocAtViT step / '
            'our ViT step (alternating blocks in one process: train_step.py --pair).']
  return '\n'.join(lines)


def drive(args) -> None:
  sizes = parse_sizes(args.sizes)
  python, authors = setup(pathlib.Path(args.setup), args.authors_url)
  out = pathlib.Path(args.out)
  rows = []
  with open(out.with_suffix('.jsonl'), 'w') as log:
    for r in range(args.rounds):
      for size, batch in sizes:
        jobs = [('ours', lambda: run_ours(size, batch, args))] + [
            (m, lambda m=m: run_torch(m, size, batch, python, authors, args)) for m in ('authors_locatvit', 'timm_vit')]
        for kind, job in (jobs if r % 2 == 0 else jobs[::-1]):
          before = load()
          result = job()
          entries = [dict(result, kind=kind)]
          if kind == 'ours':
            entries.append(dict(result['baseline'], kind='ours_vit', size=size, batch=batch))
          for e in entries:
            e.update(round=r, load_before=before)
            rows.append(e)
            log.write(json.dumps(e) + '\n')
            log.flush()
            print(json.dumps(e), flush=True)
  torch_row = next(r for r in rows if 'torch' in r)
  header = (f'Measured {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} on {platform.node()} '
            f'({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), {args.rounds} round(s); '
            f'torch {torch_row["torch"]}, timm {torch_row["timm"]}, authors\' code {AUTHORS_COMMIT}; '
            f'ours with cpu_env={next(r for r in rows if r["kind"] == "ours")["cpu_env"]}; '
            f'load averages before each run: {", ".join(sorted({r["load_before"] for r in rows}))}.')
  text = table(rows, header)
  out.write_text(text + '\n')
  print('\n' + text)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--worker', choices=['torch'], help=argparse.SUPPRESS)
  parser.add_argument('--model', choices=['authors_locatvit', 'timm_vit'], help=argparse.SUPPRESS)
  parser.add_argument('--size', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--batch', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--authors', help=argparse.SUPPRESS)
  parser.add_argument('--setup', default='/tmp/locatvit_torch', help='Scratch folder: venv/ and LocAtViT/.')
  parser.add_argument('--authors_url', default=AUTHORS_URL, help="Where to clone the authors' code from.")
  parser.add_argument('--sizes', default='224:32,512:8', help='SIZE:BATCH,... (LocAtViT-Ti/16).')
  parser.add_argument('--steps', type=int, default=5, help='Timed steps per run (median reported).')
  parser.add_argument('--warmup', type=int, default=2, help='Untimed steps first (ours: after compiling).')
  parser.add_argument('--rounds', type=int, default=2, help='Rounds over all runs, order alternating.')
  parser.add_argument('--ours_flags', default='', help='Extra benchmarks/train_step.py flags, one string.')
  parser.add_argument('--out', default='compare_pytorch.md', help='Markdown table (and .jsonl of every run).')
  args = parser.parse_args(argv)
  if args.worker == 'torch':
    torch_worker(args)
    return
  try:
    parse_sizes(args.sizes)
  except ValueError as e:
    parser.error(str(e))
  drive(args)


if __name__ == '__main__':
  main()
