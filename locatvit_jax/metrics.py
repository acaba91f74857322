"""Training metrics: a JSON-lines log, TensorBoard event files, and a progress line on stdout.

TensorBoard's format is written here in plain Python (TensorFlow is not a dependency): a TFRecord
file whose records are `Event` protocol buffers, each framed as

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little endian). The first event carries only `file_version`; every later one a `Summary` of
`simple_value` scalars, which TensorBoard's scalar dashboard reads.

Only process 0 writes (in multi-process JAX all processes compute the same scalars). A resumed
run appends to the same `metrics.jsonl`, so steps redone after a restart appear twice; readers keep
the last row of each step.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Mapping, TextIO

import jax
from etils import epath

JSONL_FILE = 'metrics.jsonl'
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
  """Writes scalars to WORKDIR/metrics.jsonl and WORKDIR/events.out.tfevents.* (process 0 only).

  `write(step, scalars)` appends one JSON object {'step': step, **scalars} and one TensorBoard
  event, and flushes both, so a crash loses nothing already written.
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._jsonl = self._events = None
    if not self.active:
      return
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    self._jsonl = (directory / JSONL_FILE).open('a')
    now = time.time()
    self.events_path = directory / f'events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}'
    self._events = self.events_path.open('wb')
    self._events.write(tfrecord(event_proto(now, 0, file_version=FILE_VERSION)))
    self._events.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    values = _check_scalars(step, scalars)
    if not self.active:
      return
    if self._jsonl is None:
      raise ValueError('MetricWriter.write after close(); expected writes before closing')
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()
    self._events.write(tfrecord(event_proto(time.time(), step, scalars=values)))
    self._events.flush()

  def close(self) -> None:
    for f in (self._jsonl, self._events):
      if f is not None:
        f.close()
    self._jsonl = self._events = None

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
