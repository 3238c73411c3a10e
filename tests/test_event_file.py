"""TensorBoard event files (mmfusion/event_file.py, mmfusion/writers.py) against TensorFlow's own
reader: tf.data checks every record's CRCs, and TensorFlow's Event protobuf parses the payloads."""
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mmfusion import event_file, writers


def read_events(path):
  import tensorflow as tf
  from tensorflow.core.util import event_pb2
  return [event_pb2.Event.FromString(record.numpy())
          for record in tf.data.TFRecordDataset(path)]


def test_crc32c_matches_the_castagnoli_check_value():
  # The check value of CRC-32C (RFC 3720, B.4): the CRC of the ASCII digits 1-9.
  assert event_file.crc32c(b'123456789') == 0xE3069283
  assert event_file.crc32c(b'') == 0
  # iSCSI's test vector: 32 bytes of zeros (RFC 3720, B.4).
  assert event_file.crc32c(bytes(32)) == 0x8A9136AA


def test_metric_writer_events_read_back_through_tensorflow(tmp_path):
  writer = writers.MetricWriter(str(tmp_path), enabled=True)
  logged = [(0, {'train/loss': 2.5, 'train/lr': 1e-3}),
            (300, {'train/loss': float('nan'), 'eval/zeroshot/top1': 0.75}),   # varint > 1 byte
            (2**40 + 7, {'train/loss': -1.25e-8, 'unicode/λ': 3.0})]
  for step, scalars in logged:
    writer.write(step, scalars)
  # Flushed at every write: readable while the run is still going.
  (path,) = glob.glob(str(tmp_path / 'tb' / 'events.out.tfevents.*'))
  assert len(read_events(path)) == 1 + len(logged)
  writer.close()

  first, *scalar_events = read_events(path)
  assert first.file_version == 'brain.Event:2'
  for event, (step, scalars) in zip(scalar_events, logged):
    assert event.step == step
    assert event.wall_time >= first.wall_time
    finite = {tag: value for tag, value in scalars.items() if math.isfinite(value)}
    got = {value.tag: value.simple_value for value in event.summary.value}
    assert got.keys() == finite.keys()       # TensorBoard gets the finite ones only
    for tag, value in finite.items():
      assert got[tag] == np.float32(value)   # simple_value is a float32
  # The JSON lines keep every value, non-finite too.
  with open(tmp_path / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert [line['step'] for line in lines] == [step for step, _ in logged]
  assert math.isnan(lines[1]['train/loss'])


def test_a_damaged_record_fails_tensorflows_crc_check(tmp_path):
  # The reference really checks what the writer computes: one flipped payload byte is caught.
  import tensorflow as tf
  writer = event_file.EventFileWriter(str(tmp_path))
  writer.write(1, {'loss': 1.0})
  writer.close()
  data = bytearray(open(writer.path, 'rb').read())
  data[-6] ^= 0x01                             # inside the last record's payload
  damaged = tmp_path / 'damaged.tfevents'
  damaged.write_bytes(bytes(data))
  with pytest.raises(tf.errors.DataLossError):
    read_events(str(damaged))


def test_writers_opened_in_the_same_second_get_their_own_files(tmp_path):
  first = event_file.EventFileWriter(str(tmp_path))
  second = event_file.EventFileWriter(str(tmp_path))
  first.write(1, {'a': 1.0})
  second.write(1, {'a': 2.0})
  first.close()
  second.close()
  assert first.path != second.path
  assert [read_events(p)[1].summary.value[0].simple_value
          for p in (first.path, second.path)] == [1.0, 2.0]


def test_a_negative_or_fractional_step_is_refused():
  with pytest.raises(ValueError, match='not negative'):
    event_file.scalar_event(-1, {'loss': 1.0}, wall_time=0.0)
  with pytest.raises(TypeError):
    event_file.scalar_event(1.5, {'loss': 1.0}, wall_time=0.0)


def test_floats_beyond_float32_are_its_infinities_and_numpy_steps_are_steps(tmp_path):
  scalars = {'big': 1e40, 'small': -1e40, 'max': float(np.finfo(np.float32).max)}
  writer = event_file.EventFileWriter(str(tmp_path))
  writer.write(np.int64(7), scalars)
  writer.close()
  event = read_events(writer.path)[1]
  assert event.step == 7
  got = {value.tag: value.simple_value for value in event.summary.value}
  with np.errstate(over='ignore'):              # the reference: numpy's float32 cast
    assert got == {tag: np.float32(value) for tag, value in scalars.items()}
  assert math.isinf(got['big']) and got['small'] < 0


def test_writing_metrics_imports_neither_torch_nor_tensorflow(tmp_path):
  # tensorboardX imported torch wherever torch was installed: 1.4 s per launch of the CLI.
  code = ('import sys; from mmfusion import writers; '
          f'w = writers.MetricWriter({str(tmp_path)!r}, enabled=True); w.write(1, {{"a": 1.0}}); '
          'w.close(); print(sorted({"torch", "tensorflow", "tensorboardX"} & set(sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'), check=True)
  assert out.stdout.strip() == '[]'
