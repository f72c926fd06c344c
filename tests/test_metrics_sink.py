"""MetricsSink: metrics.jsonl and TensorBoard scalars, without importing torch."""

import glob
import json
import struct
import subprocess
import sys

from tensorboardX.proto import event_pb2

WRITE = """
import sys
from llava_jax.train.metrics import MetricsSink
sink = MetricsSink(sys.argv[1], total_steps=4, start_step=0, progress=False)
for step, loss in ((2, 1.5), (4, 0.25)):
  sink.write({"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 2.0, "tokens_per_s": 10.0, "skipped": 0})
sink.close()
print("torch" in sys.modules)
"""


def _events(path):
  """TFRecord framing: u64 length, u32 crc, payload, u32 crc."""
  with open(path, "rb") as f:
    data = f.read()
  events, at = [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return events


def test_scalars_reach_jsonl_and_tensorboard_without_torch(tmp_path):
  out = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path)], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in lines] == [(2, 1.5), (4, 0.25)]
  (path,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  scalars = {(v.tag, e.step): v.simple_value for e in _events(path) for v in e.summary.value}
  assert scalars[("train/loss", 2)] == 1.5 and scalars[("train/loss", 4)] == 0.25
  assert scalars[("train/grad_norm", 4)] == 2.0
