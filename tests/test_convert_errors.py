"""Bad input to `llava-jax convert`: exit code 2, one stderr line naming the file and key, and no
output folder (nor temporary sibling) left behind. Runs the real CLI in subprocesses, in parallel."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from llava_jax.weights import hf, mapping

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from configs import models  # noqa: E402

KEY = "language_model.model.layers.1.mlp.up_proj.weight"


def _good_folder(path):
  """A tiny HF LLaVA folder written from randomly initialized llava-jax parameters."""
  config = models.get("tiny")
  rng = np.random.default_rng(0)
  params = {}
  for rule in mapping.rules(config):
    layers = (mapping.layer_count(rule, config),) if rule.stacked else ()
    node = params
    *parents, leaf = rule.path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = rng.standard_normal(layers + rule.shape).astype(np.float32)
  os.makedirs(path)
  hf.write_hf_llava(str(path), config, params)
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def _edit_tensors(folder, edit):
  path = os.path.join(folder, hf.SAFE_WEIGHTS)
  with safe_open(path, "numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, path)


def _cases(root, good):
  """name -> (argv after `convert`, output folder, strings the error line must contain)."""
  cases = {}

  def folder(name):
    dst = root / name
    shutil.copytree(good, dst)
    return dst

  d = folder("no_config")
  os.remove(d / "config.json")
  cases["no_config"] = (["hf-to-jax", d], "config.json")

  d = folder("model_type")
  config = json.loads((d / "config.json").read_text())
  config["model_type"] = "blip-2"
  (d / "config.json").write_text(json.dumps(config))
  cases["model_type"] = (["hf-to-jax", d], "model_type", "blip-2")

  for section, value in (("text_config", "gemma"), ("vision_config", "dinov2")):
    d = folder(f"{section}_model_type")
    config = json.loads((d / "config.json").read_text())
    config[section]["model_type"] = value
    (d / "config.json").write_text(json.dumps(config))
    cases[f"{section}_model_type"] = (["hf-to-jax", d], str(d / "config.json"), f"{section}.model_type", repr(value))

  d = folder("missing")
  _edit_tensors(d, lambda t: t.pop(KEY))
  cases["missing"] = (["hf-to-jax", d], KEY, hf.SAFE_WEIGHTS)

  d = folder("shape")
  _edit_tensors(d, lambda t: t.update({KEY: np.zeros((3, 4), np.float32)}))
  cases["shape"] = (["hf-to-jax", d], KEY, "(3, 4)", hf.SAFE_WEIGHTS)

  d = folder("truncated")
  data = (d / hf.SAFE_WEIGHTS).read_bytes()
  (d / hf.SAFE_WEIGHTS).write_bytes(data[:len(data) - 1000])
  cases["truncated"] = (["hf-to-jax", d], hf.SAFE_WEIGHTS, "tensor ")

  d = folder("exists")
  (root / "exists_out").mkdir()
  cases["exists"] = (["hf-to-jax", d], "exists_out", "already exists")

  cases["jax_missing_src"] = (["jax-to-hf", root / "nowhere"], "nowhere")
  cases["orig_not_original"] = (["llava-to-hf", good], "config.json", "not an original LLaVA config")
  return {name: (argv, root / f"{name}_out", expect) for name, (argv, *expect) in cases.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad")
  _good_folder(root / "good")
  cases = _cases(root, root / "good")
  env = dict(os.environ, JAX_PLATFORMS="cpu")


  def run(name):
    argv, out, _ = cases[name]
    p = subprocess.run([sys.executable, "-m", "llava_jax", "convert", *map(str, argv), str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    return name, (p.stdout, p.stderr, p.returncode)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # more than the cores only adds contention
    done = dict(pool.map(run, cases))
  return root, cases, done


@pytest.mark.parametrize("name", ["no_config", "model_type", "text_config_model_type", "vision_config_model_type",
                                  "missing", "shape", "truncated", "exists", "jax_missing_src", "orig_not_original"])
def test_bad_input_exits_2_with_one_line(results, name):
  root, cases, done = results
  _, out, expect = cases[name]
  stdout, stderr, code = done[name]
  assert code == 2, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("llava-jax: error: "), stderr
  for text in expect:
    assert text in lines[0], (text, lines[0])
  if name != "exists":
    assert not out.exists()
  assert not [p for p in os.listdir(root) if ".tmp-" in p]  # no temporary sibling either
