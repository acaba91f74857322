"""Training metrics: a JSON-lines log, TensorBoard event files, and a progress line on stdout.

TensorBoard's format is written here in plain Python (TensorFlow is not a dependency): a TFRecord
file whose records are `Event` protocol buffers, each framed as

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little endian). The first event carries only `file_version`; every later one a `Summary` of
`simple_value` scalars, which TensorBoard's scalar dashboard reads.

Only process 0 writes (in multi-process JAX all processes compute the same scalars).

Object stores (gs://) cannot append and upload a file only when it is closed, so every write
replaces whole files: each writer (one per run or resume) keeps its rows in numbered parts of at
most `ROWS_PER_PART` rows, and rewrites the current part after each row, as

    WORKDIR/metrics/<writer id>-<part>.jsonl
    WORKDIR/events.out.tfevents.<writer id>.<host>.<part>

(the writer id is the start time in nanoseconds, so names sort in writing order; TensorBoard reads
every event file of a folder). A crash loses nothing already written, and no write costs more than
one part. `read_metrics(workdir)` merges the parts; steps redone after a resume keep their newest
row.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import sys
import time
from typing import Mapping, TextIO

import jax

from locatvit_jax import paths

METRICS_DIR = 'metrics'
ROWS_PER_PART = 100
FILE_VERSION = 'brain.Event:2'

# -- TFRecord framing ------------------------------------------------------------------------------
_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's CRC: rotated and offset so that CRCs of CRC-bearing data stay well distributed."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  length = struct.pack('<Q', len(data))
  return length + struct.pack('<I', masked_crc32c(length)) + data + struct.pack('<I', masked_crc32c(data))


# -- Event protocol buffers (tensorflow/core/util/event.proto, summary.proto) ----------------------
def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits, value = value & 0x7F, value >> 7
    out.append(bits | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def event_proto(wall_time: float, step: int, *, file_version: str | None = None,
                scalars: Mapping[str, float] | None = None) -> bytes:
  """Serialised `Event{wall_time=1, step=2, file_version=3, summary=5}` with
  `Summary{value=1: Value{tag=1, simple_value=2}}`."""
  out = _field(1, 1) + struct.pack('<d', wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b''.join(_length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5) + struct.pack('<f', v))
                      for tag, v in scalars.items())
    out += _length_delimited(5, values)
  return out


# -- writers ---------------------------------------------------------------------------------------
def _check_scalars(step, scalars: Mapping) -> dict[str, float]:
  if isinstance(step, bool) or not isinstance(step, int) or step < 0:
    raise ValueError(f'step={step!r}; expected an integer >= 0')
  out = {}
  for name, value in scalars.items():
    try:
      out[str(name)] = float(value)
    except (TypeError, ValueError):
      raise ValueError(f'metric {name!r} is {value!r}; expected a real number') from None
  return out


class MetricWriter:
  """Writes scalars as JSON lines and TensorBoard events under a workdir (process 0 only).

  `write(step, scalars)` adds one row {'step': step, **scalars} and one event, and rewrites the
  current part files (module docstring), so a crash loses nothing already written.
  """

  def __init__(self, workdir, rows_per_part: int = ROWS_PER_PART):
    self.active = jax.process_index() == 0
    self._open = True
    self._workdir = paths.path(workdir)
    self._rows_per_part = rows_per_part
    self._id = f'{time.time_ns():019d}'
    self._part, self._rows, self._events = 0, [], []

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    values = _check_scalars(step, scalars)
    if not self._open:
      raise ValueError('MetricWriter.write after close(); expected writes before closing')
    if not self.active:
      return
    if len(self._rows) == self._rows_per_part:
      self._part, self._rows, self._events = self._part + 1, [], []
    if not self._events:  # each event file starts with the file version
      self._events.append(tfrecord(event_proto(time.time(), 0, file_version=FILE_VERSION)))
    self._rows.append(json.dumps({'step': step, **values}) + '\n')
    self._events.append(tfrecord(event_proto(time.time(), step, scalars=values)))
    paths.write_text(self._workdir / METRICS_DIR / f'{self._id}-{self._part:05d}.jsonl', ''.join(self._rows))
    paths.write_bytes(self._workdir / f'events.out.tfevents.{self._id}.{socket.gethostname()}.{self._part:05d}',
                      b''.join(self._events))

  def close(self) -> None:
    self._open = False

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir) -> list[dict]:
  """Every logged row of a workdir, one per step (the newest where a resume redid steps), by step."""
  directory = paths.path(workdir) / METRICS_DIR
  rows = {}
  if directory.is_dir():
    for part in sorted(directory.glob('*.jsonl'), key=lambda p: p.name):
      for line in paths.read_text(part).splitlines():
        row = json.loads(line)
        rows[row['step']] = row
  return [rows[step] for step in sorted(rows)]


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class ProgressLine:
  """`step N/T | loss .. | lr .. | img/s .. | ETA hh:mm:ss` on stdout, at most every `every_s` seconds.

  The ETA uses the step rate since the first update, so compilation in step 1 does not count.
  The last step is always printed; `close()` prints the newest update if it was held back.
  """

  def __init__(self, total_steps: int, every_s: float = 10.0, stream: TextIO | None = None):
    if total_steps < 1 or every_s < 0:
      raise ValueError(f'total_steps={total_steps}, every_s={every_s}; expected total_steps >= 1 and every_s >= 0')
    self.total_steps, self.every_s = total_steps, every_s
    self.active = jax.process_index() == 0
    self._stream = stream
    self._first = None  # (time, step) of the first update
    self._printed_at = -math.inf
    self._pending = None  # the newest line not printed yet

  def _line(self, step: int, scalars: Mapping[str, float], now: float) -> str:
    parts = [f'step {step}/{self.total_steps}']
    for key, label, fmt in (('loss', 'loss', '.4f'), ('lr', 'lr', '.3e'), ('img_per_s', 'img/s', '.1f')):
      if key in scalars:
        parts.append(f'{label} {float(scalars[key]):{fmt}}')
    t0, s0 = self._first
    eta = (self.total_steps - step) * (now - t0) / (step - s0) if step > s0 else None
    parts.append(f'ETA {format_duration(eta) if eta is not None else "--:--:--"}')
    return ' | '.join(parts)

  def update(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    now = time.monotonic()
    if self._first is None:
      self._first = (now, step)
    self._pending = self._line(step, scalars, now)
    if now - self._printed_at >= self.every_s or step >= self.total_steps:
      self._print(now)

  def _print(self, now: float) -> None:
    stream = self._stream or sys.stdout  # looked up late: test runners swap sys.stdout
    print(self._pending, file=stream, flush=True)
    self._printed_at, self._pending = now, None

  def close(self) -> None:
    if self._pending is not None:
      self._print(time.monotonic())
