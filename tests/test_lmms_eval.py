"""lmms-eval 0.7.3 (the [eval] extra, in its own venv: launch/lmms_eval_venv.sh) evaluates the tiny model through
the `llava_jax` model class on a local task folder (a task yaml over a parquet file): generate_until gives the
answers and POPE scores `llava-jax eval` gives on the same parquet (read as an lmms-lab export), loglikelihood the
losses transformers gives for the same prompts and continuations; and through `llava-jax serve` with lmms-eval's
OpenAI-compatible model, the same answers.

The venv is LLAVA_JAX_LMMS_PYTHON's, else .venv-lmms-eval/ at the repository root, built on first use (minutes).
"""

import glob
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import eval_fixtures
from hf_fixtures import save_tiny_hf_folder
from llava_jax.eval import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-lmms-eval")
MAX_NEW, BATCH = 4, 4
OBJECTS = ("dog", "cat", "car", "bus", "cup", "tree")

TASK_UTILS = '''
from llava_jax.eval import pope
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def doc_to_visual(doc):
  return [doc["image"].convert("RGB")]


def doc_to_text(doc):  # LLaVA-1.5's POPE prompt, as llava-jax eval asks it
  return f"{doc['question']}\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
  record = {"prediction": results[0], "label": doc["answer"]}
  return {m: record for m in METRICS}


def _aggregate(metric):
  return lambda records: pope.metrics([r["prediction"] for r in records], [r["label"] for r in records])[metric]


accuracy, precision, recall, f1, yes_ratio = (_aggregate(m) for m in METRICS)
'''

COMMON = """dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
"""
GENERATE = """task: tiny_pope
output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
""" + "".join(f"  - metric: {m}\n    aggregation: !function utils.{m}\n"
              for m in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
CHOICE = """task: tiny_pope_choice
output_type: multiple_choice
doc_to_choice: ["yes", "no"]
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def lmms_python():
  python = os.environ.get("LLAVA_JAX_LMMS_PYTHON") or os.path.join(VENV, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([os.path.join(ROOT, "launch", "lmms_eval_venv.sh"), VENV], check=True, timeout=1800,
                   env=dict(os.environ, PYTHON=sys.executable))
  return python


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("lmms")
  model = save_tiny_hf_folder(root / "model")
  (model / "processor_config.json").write_text(json.dumps({  # for transformers' LlavaProcessor (the reference)
      "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 7,
      "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}))
  rows = [{"question_id": str(i), "question": f"Is there a {o} in the image?", "answer": "yes" if i % 3 else "no",
           "image_source": str(i), "image": eval_fixtures.png(i % 2 + 1), "category": "random"}
          for i, o in enumerate(OBJECTS)]
  eval_fixtures.write_export(root / "data" / "POPE" / "data", "test", rows)
  parquet = next((root / "data" / "POPE" / "data").glob("*.parquet"))
  tasks = root / "tasks"
  tasks.mkdir()
  (tasks / "utils.py").write_text(TASK_UTILS)
  (tasks / "tiny_pope.yaml").write_text(COMMON.format(parquet=parquet) + GENERATE.format(max_new=MAX_NEW))
  (tasks / "tiny_pope_choice.yaml").write_text(COMMON.format(parquet=parquet) + CHOICE)
  return root, model, rows


def _lmms_eval(python, root, out, tasks, *model):
  """Runs lmms-eval (--model ...) on the local tasks; (results, {task: samples by doc_id})."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(root / "hf_cache"), XLA_FLAGS="")
  done = subprocess.run([python, "-m", "lmms_eval", *model, "--tasks", ",".join(tasks), "--include_path",
                         str(root / "tasks"), "--output_path", str(out), "--log_samples"],
                        capture_output=True, text=True, env=env, timeout=900)
  assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
  written = lambda pattern: glob.glob(str(out / "*" / pattern))[0]
  results = json.loads(open(written("*_results.json")).read())["results"]
  samples = {task: sorted((json.loads(line) for line in open(written(f"*_{task}.jsonl"))), key=lambda s: s["doc_id"])
             for task in tasks}
  return results, samples


@pytest.fixture(scope="module")
def lmms_run(lmms_python, setup):
  root, model, _ = setup
  return _lmms_eval(lmms_python, root, root / "out", ("tiny_pope", "tiny_pope_choice"), "--model", "llava_jax",
                    "--model_args", f"pretrained={model}", "--batch_size", str(BATCH))


def test_generate_until_answers_and_scores_as_llava_jax_eval(setup, lmms_run, tmp_path):
  root, model, rows = setup
  results, samples = lmms_run
  ours = runner.eval_command(str(model), "pope", str(root / "data"), str(tmp_path / "out"), batch_size=BATCH,
                             max_new_tokens=MAX_NEW)
  answers = {json.loads(l)["question_id"]: json.loads(l)["text"]
             for l in (tmp_path / "out" / "pope" / "answers.jsonl").read_text().splitlines()}
  assert [s["filtered_resps"] for s in samples["tiny_pope"]] == [answers[r["question_id"]] for r in rows]
  assert any(answers.values())  # text was produced
  assert {m: results["tiny_pope"][f"{m},none"] for m in ours["pope"]["random"]} == ours["pope"]["random"]


def _transformers_losses(model, rows):
  """(doc, choice) -> (mean NLL of " yes" / " no" after the prompt, greedy?) from transformers' LLaVA."""
  processor = transformers.LlavaProcessor.from_pretrained(str(model), local_files_only=True)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(model)).eval()
  out = {}
  for i, row in enumerate(rows):
    question = f"{row['question']}\nAnswer the question using a single word or phrase."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(io.BytesIO(row["image"]))], text=text, return_tensors="pt")
    for choice in ("yes", "no"):
      continuation = processor.tokenizer(f" {choice}", add_special_tokens=False, return_tensors="pt")["input_ids"]
      ids = torch.cat([inputs["input_ids"], continuation], 1)
      with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0].double()
      n = continuation.shape[1]
      log_probs = torch.log_softmax(logits[-n - 1:-1], -1)
      targets = continuation[0]
      out[i, choice] = (-log_probs[torch.arange(n), targets].mean().item(),
                        bool((log_probs.argmax(-1) == targets).all()))
  return out


def test_loglikelihood_equals_transformers(setup, lmms_run):
  _, model, rows = setup
  results, samples = lmms_run
  reference = _transformers_losses(model, rows)
  for sample in samples["tiny_pope_choice"]:
    for choice, (loss, greedy) in zip(("yes", "no"), sample["filtered_resps"]):  # logged as strings
      want_loss, want_greedy = reference[sample["doc_id"], choice]
      assert float(loss) == pytest.approx(want_loss, rel=1e-4) and (greedy == "True") == want_greedy
  # lmms-eval's accuracy: the choice of least loss is the answer
  picked = [min(("yes", "no"), key=lambda c: reference[i, c][0]) for i in range(len(rows))]
  assert results["tiny_pope_choice"]["acc,none"] == pytest.approx(np.mean([p == r["answer"]
                                                                            for p, r in zip(picked, rows)]))


def test_through_llava_jax_serve_with_lmms_evals_openai_model(lmms_python, setup, lmms_run, tmp_path):
  root, model, _ = setup
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([sys.executable, "-m", "llava_jax", "serve", "--model", str(model), "--port", str(port),
                             "--served-model-name", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, XLA_FLAGS=""))
  try:
    deadline = time.monotonic() + 120
    while True:
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        break
      except OSError:
        assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.5)
    _, samples = _lmms_eval(lmms_python, root, tmp_path / "out", ("tiny_pope",), "--model", "openai", "--model_args",
                            f"model=tiny,base_url=http://127.0.0.1:{port}/v1,api_key=none")
  finally:
    server.terminate()
    server.wait(timeout=30)
  assert [s["filtered_resps"] for s in samples["tiny_pope"]] == [s["filtered_resps"] for s in lmms_run[1]["tiny_pope"]]
