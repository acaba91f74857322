"""Metric writers: JSON lines, TensorBoard events read back by an independent reader, progress line."""

import io
import json
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from locatvit_jax import metrics


def _crc32c_bitwise(data: bytes) -> int:
  """CRC-32C one bit at a time (no table): an independent check of the writer's CRCs."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c_bitwise(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_class():
  """tensorboard's Event/Summary messages (the fields we use), built with the protobuf runtime."""
  f = descriptor_pb2.FileDescriptorProto(name='test_event.proto', package='t', syntax='proto3')
  T = descriptor_pb2.FieldDescriptorProto
  value = f.message_type.add(name='Value')
  value.field.add(name='tag', number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
  value.field.add(name='simple_value', number=2, type=T.TYPE_FLOAT, label=T.LABEL_OPTIONAL)
  summary = f.message_type.add(name='Summary')
  summary.field.add(name='value', number=1, type=T.TYPE_MESSAGE, type_name='.t.Value', label=T.LABEL_REPEATED)
  event = f.message_type.add(name='Event')
  event.field.add(name='wall_time', number=1, type=T.TYPE_DOUBLE, label=T.LABEL_OPTIONAL)
  event.field.add(name='step', number=2, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL)
  event.field.add(name='file_version', number=3, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
  event.field.add(name='summary', number=5, type=T.TYPE_MESSAGE, type_name='.t.Summary', label=T.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('t.Event'))


def read_events(path):
  """TFRecord framing with both CRCs checked, each record decoded as an Event."""
  Event, data, events, pos = _event_class(), path.read_bytes(), [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,), (header_crc,) = struct.unpack('<Q', header), struct.unpack('<I', data[pos + 8:pos + 12])
    assert header_crc == _masked(header), f'bad length CRC at byte {pos}'
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])
    assert payload_crc == _masked(payload), f'bad data CRC at byte {pos}'
    events.append(Event.FromString(payload))
    pos += 16 + length
  return events


def test_crc32c_known_values():
  assert metrics.crc32c(b'') == 0
  assert metrics.crc32c(b'123456789') == 0xE3069283  # the CRC-32C check value
  blob = np.random.default_rng(0).bytes(300)
  assert metrics.crc32c(blob) == _crc32c_bitwise(blob)


def test_jsonl_and_tensorboard_round_trip(tmp_path):
  rows = [(1, {'loss': 2.5, 'lr': 1e-4, 'img_per_s': 0.0}),
          (2, {'loss': np.float32(2.25), 'lr': jnp.asarray(2e-4), 'img_per_s': 812.5}),
          (300, {'loss': 1.75, 'eval_top1': 0.5})]
  with metrics.MetricWriter(str(tmp_path)) as writer:
    for step, scalars in rows:
      writer.write(step, scalars)
  logged = metrics.read_metrics(tmp_path)
  assert [r['step'] for r in logged] == [1, 2, 300]
  for got, (_, scalars) in zip(logged, rows):
    np.testing.assert_allclose([got[k] for k in scalars], [float(v) for v in scalars.values()], rtol=1e-7)

  (events_file,) = tmp_path.glob('events.out.tfevents.*')
  events = read_events(events_file)
  assert events[0].file_version == 'brain.Event:2' and not events[0].HasField('summary')
  assert [e.step for e in events[1:]] == [1, 2, 300]
  assert all(e.wall_time > 1.6e9 for e in events)
  for event, (_, scalars) in zip(events[1:], rows):
    decoded = {v.tag: v.simple_value for v in event.summary.value}
    assert list(decoded) == list(scalars)
    np.testing.assert_allclose(list(decoded.values()), [float(v) for v in scalars.values()], rtol=1e-6)


def test_reader_rejects_a_corrupted_record(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write(7, {'loss': 1.0})
  (events_file,) = tmp_path.glob('events.out.tfevents.*')
  data = bytearray(events_file.read_bytes())
  data[-6] ^= 0x01  # a bit of the last event's payload
  events_file.write_bytes(bytes(data))
  with pytest.raises(AssertionError, match='bad data CRC'):
    read_events(events_file)


def test_resumed_runs_keep_every_row_and_the_newest_of_a_redone_step(tmp_path):
  # Session 1 logs steps 1-3 and dies; session 2 resumes from step 1's checkpoint and redoes 2, 3.
  with metrics.MetricWriter(str(tmp_path)) as writer:
    for step in (1, 2, 3):
      writer.write(step, {'loss': float(step)})
  with metrics.MetricWriter(str(tmp_path)) as writer:
    for step in (2, 3, 4):
      writer.write(step, {'loss': 10.0 + step})
  assert [(r['step'], r['loss']) for r in metrics.read_metrics(tmp_path)] == [(1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]
  # Two writers, two TensorBoard event files, sorted in writing order.
  events = sorted(tmp_path.glob('events.out.tfevents.*'))
  assert [[e.step for e in read_events(f)[1:]] for f in events] == [[1, 2, 3], [2, 3, 4]]


def test_writes_replace_whole_files_in_parts(tmp_path):
  """No append and no buffered flush (object stores have neither): each row rewrites one bounded part."""
  writer = metrics.MetricWriter(str(tmp_path), rows_per_part=2)
  writer.write(1, {'loss': 1.0})
  (part,) = (tmp_path / metrics.METRICS_DIR).iterdir()
  assert part.read_text() == '{"step": 1, "loss": 1.0}\n'  # on disk before close()
  for step in (2, 3, 4, 5):
    writer.write(step, {'loss': float(step)})
  parts = sorted((tmp_path / metrics.METRICS_DIR).iterdir())
  assert [[json.loads(l)['step'] for l in p.read_text().splitlines()] for p in parts] == [[1, 2], [3, 4], [5]]
  events = sorted(tmp_path.glob('events.out.tfevents.*'))
  assert [[e.step for e in read_events(f)[1:]] for f in events] == [[1, 2], [3, 4], [5]]
  assert all(read_events(f)[0].file_version == 'brain.Event:2' for f in events)


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with metrics.MetricWriter(str(tmp_path / 'w')) as writer:
    writer.write(1, {'loss': 1.0})
  progress = metrics.ProgressLine(10, every_s=0, stream=(out := io.StringIO()))
  progress.update(1, {'loss': 1.0})
  assert not (tmp_path / 'w').exists() and out.getvalue() == ''


@pytest.mark.parametrize('step, scalars, message', [
    (-1, {'loss': 1.0}, 'step=-1; expected an integer >= 0'),
    (1.5, {'loss': 1.0}, 'step=1.5'),
    (1, {'loss': 'low'}, "metric 'loss' is 'low'; expected a real number"),
])
def test_bad_writes_fail_clearly(tmp_path, step, scalars, message):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match=message):
      writer.write(step, scalars)


def test_progress_line_format_throttle_and_eta(monkeypatch):
  clock = iter([0.0, 100.0, 101.0, 102.0])
  monkeypatch.setattr(metrics.time, 'monotonic', lambda: next(clock))
  out = io.StringIO()
  progress = metrics.ProgressLine(100, every_s=50, stream=out)
  progress.update(1, {'loss': 2.5, 'lr': 1e-3, 'img_per_s': 0.0, 'grad_norm': 3.0})
  progress.update(11, {'loss': 2.0, 'lr': 2e-3, 'img_per_s': 64.0})  # 10 s/step: 89 steps left
  progress.update(12, {'loss': 1.9})  # held back: printed 1 s ago
  progress.close()  # prints the held-back line
  progress.close()  # nothing left
  lines = out.getvalue().splitlines()
  assert lines == [
      'step 1/100 | loss 2.5000 | lr 1.000e-03 | img/s 0.0 | ETA --:--:--',
      'step 11/100 | loss 2.0000 | lr 2.000e-03 | img/s 64.0 | ETA 00:14:50',
      'step 12/100 | loss 1.9000 | ETA 00:13:28',
  ]
  assert all(re.fullmatch(r'step \d+/100( \| [\w/]+ [^|]+)* \| ETA [\d:-]{8}', l) for l in lines)


def test_progress_line_always_prints_the_last_step():
  out = io.StringIO()
  progress = metrics.ProgressLine(3, every_s=1e9, stream=out)
  for step in (1, 2, 3):
    progress.update(step, {'loss': 1.0})
  assert [l.split(' |')[0] for l in out.getvalue().splitlines()] == ['step 1/3', 'step 3/3']
