"""`llava-jax demo --quick` end to end, run once: its results contract and grounding margin,
generate and chat on its export, and notebooks/llava_jax_demo.ipynb executed on its training;
workdir safety, the committed notebook, and the demo's building blocks."""

import ast
import inspect
import json
import math
import os
import subprocess
import sys
from collections import Counter

import nbformat
import pytest

import notebook_kernel
from xla_flags import without_device_count, without_fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "llava_jax_demo.ipynb")
CONTRACT_KEYS = ("accuracy", "blind_accuracy", "pope", "blind_pope", "seconds", "params", "examples")
QA_TYPES = ("color", "shape", "count", "position", "existence")
POPE_SPLITS = ("random", "popular", "adversarial")
POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
PHASES = ("data", "stage0", "stage1", "stage2", "eval", "total")
EVALUATION = ("accuracy", "blind_accuracy", "pope", "blind_pope", "params")
PROBE_TAG = "NOTEBOOK_PROBE "

# Appended to a copy of the notebook: reports what its final cells produced.
PROBE = f"""
import json as _json
print({PROBE_TAG!r} + _json.dumps({{
    "results": {{k: results[k] for k in {EVALUATION + ("seconds", "losses")!r}}},
    "results_keys": sorted(results),
    "chat_log": chat_log,
    "answer": answer,
    "export": export,
    "workdir": workdir,
}}))
"""


def _one_device_xla_flags():
  # One real CPU device and XLA's default optimization level, as the demo's machine and a user's kernel
  # have (conftest fakes 8 for the sharding tests, and --quick's stage-2 batch of 4 cannot split over 8;
  # the other tests compile at level 0, which runs the demo's stage-2 training 2x slower: 71 s against 37).
  return without_fast_compile(without_device_count(os.environ.get("XLA_FLAGS", "")))


def _cli(*args, timeout=600, stdin=None):
  env = dict(os.environ, XLA_FLAGS=_one_device_xla_flags(), PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", "llava_jax", *args], capture_output=True, text=True, input=stdin,
                        timeout=timeout, env=env)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
  """One `llava-jax demo --quick` (the command `make demo` runs, at the quick sizes): the tests of
  its outputs read this run, and the notebook explores its training instead of training again."""
  workdir = tmp_path_factory.mktemp("quick_demo") / "demo"
  proc = _cli("demo", "--workdir", str(workdir), "--quick", timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / "results.json") as f:
    return workdir, json.load(f)


def _assert_evaluation_contract(r):
  for key in ("accuracy", "blind_accuracy"):
    assert set(r[key]) == set(QA_TYPES)
    assert all(0.0 <= v <= 1.0 for v in r[key].values() if not math.isnan(v)), r[key]  # nan: a type without questions
  for key in ("pope", "blind_pope"):
    assert set(r[key]) == set(POPE_SPLITS)
    assert all(set(POPE_KEYS) <= set(m) for m in r[key].values())
  assert set(r["params"]) == {"vision_tower", "projector", "language_model"} and all(r["params"].values())
  assert all(r["seconds"][k] > 0 for k in PHASES)


def test_demo_quick_end_to_end(quick_demo):
  workdir, r = quick_demo
  _assert_evaluation_contract(r)
  assert all(r["cpu_seconds"][k] > 0 for k in PHASES)
  assert r["examples"] and all(os.path.isfile(e["image"]) for e in r["examples"])
  assert (workdir / "losses.png").stat().st_size > 0
  assert set(r["headline"]) == {"accuracy", "blind_accuracy"}
  from llava_jax.data import instruct_engine
  with open(workdir / "data" / "test.json") as f:
    asked = Counter(q["qtype"] for q in instruct_engine.make_eval_questions(json.load(f), r["settings"]["seed"]))
  for qtype, groups in r["accuracy_by_reference"].items():  # each color/shape question in exactly one group
    assert set(groups) == {"one_attribute", "with_size"} and sum(g["count"] for g in groups.values()) == asked[qtype]
  # The quick run grounds color first: 35-58 points over blind on seeds 0-2 (benchmarks/demo.md).
  # A 20-point margin is ~7 answers.
  assert r["accuracy"]["color"] >= r["blind_accuracy"]["color"] + 0.2, (r["accuracy"], r["blind_accuracy"])


def test_demo_pope_through_llava_jax_eval_equals_its_own(quick_demo, tmp_path):
  """The demo's POPE folder: its own answers scored by eval's POPE task (results["eval"]), and `llava-jax eval`
  asking the export anew (as the demo asks: no answer-format suffix, 20 new tokens), equal the demo's POPE."""
  workdir, r = quick_demo
  assert {split: r["eval"]["pope"][split] for split in POPE_SPLITS} == r["pope"]
  assert r["eval"]["gqa"]["answered"] == r["counts"]["qa"] and 0 <= r["eval"]["gqa"]["accuracy"] <= 1
  out = tmp_path / "out"
  proc = _cli("eval", "--model", str(workdir / "export"), "--task", "pope", "--data", str(workdir / "eval" / "data"),
              "--out", str(out), "--batch-size", "64", "--max-new-tokens", "20", "--no-answer-format")
  assert proc.returncode == 0, proc.stderr[-3000:]
  fresh = json.loads((out / "results.json").read_text())["pope"]
  assert fresh["answered"] == sum(r["counts"][f"pope_{split}"] for split in POPE_SPLITS)
  assert {split: fresh[split] for split in POPE_SPLITS} == r["pope"]


def test_generate_and_chat_on_the_export(quick_demo):
  workdir, r = quick_demo
  export, image = str(workdir / "export"), r["examples"][0]["image"]
  gen = _cli("generate", "--model", export, "--image", image, "--prompt", "How many objects are there?")
  assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]
  chat = _cli("chat", "--model", export, "--image", image, stdin="What color is the circle?\n")
  assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]


def test_notebook_runs_on_the_quick_demos_training(quick_demo, tmp_path, monkeypatch):
  """The notebook in quick mode with TRAINED_WORKDIR: data, export, evaluation and chat run in its
  kernel; stages 0-2 load the demo's run. Its evaluation of that training is the demo's, number for number."""
  from llava_jax.demo import recipe
  demo_workdir, demo = quick_demo
  trained = recipe.finished_training(str(demo_workdir), recipe.QUICK, True)  # what the notebook loads
  assert os.path.isfile(os.path.join(trained["stage0"]["model"], "config.json"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(PROBE))
  workdir = tmp_path / "workdir"
  monkeypatch.setenv("LLAVA_JAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("LLAVA_JAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("LLAVA_JAX_NOTEBOOK_TRAINED_WORKDIR", str(demo_workdir))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
  monkeypatch.setenv("XLA_FLAGS", _one_device_xla_flags())
  notebook_kernel.execute(nb, tmp_path)

  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.output_type != "error", out

  probe = [o.text for o in nb.cells[-1].outputs if o.output_type == "stream" and PROBE_TAG in o.text]
  assert probe, nb.cells[-1].outputs
  got = json.loads(probe[0].split(PROBE_TAG, 1)[1])
  r = got["results"]
  assert set(CONTRACT_KEYS) <= set(got["results_keys"])
  _assert_evaluation_contract(r)
  # Same training, same held-out questions, greedy answers (json: nan compares equal to itself).
  assert all(json.dumps(r[k], sort_keys=True) == json.dumps(demo[k], sort_keys=True) for k in EVALUATION), \
      {k: (r[k], demo[k]) for k in EVALUATION}
  assert r["losses"] == demo["losses"]

  assert len(got["chat_log"]) >= 2
  assert all(isinstance(q, str) and isinstance(a, str) and a.strip() for q, a in got["chat_log"])
  assert isinstance(got["answer"], str) and got["answer"].strip()

  # The notebook's own files: results.json (same contract), the loss plot, and the exported model folder.
  assert got["workdir"] == str(workdir) and got["export"] == str(workdir / "export")
  with open(workdir / "results.json") as f:
    assert set(CONTRACT_KEYS) <= set(json.load(f))
  assert (workdir / "losses.png").stat().st_size > 0
  assert os.path.isfile(os.path.join(got["export"], "config.json"))
  # Figures were drawn inline: the data, loss, and evaluation cells show images.
  pngs = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
  assert pngs >= 6, pngs


def test_notebook_calls_fit_the_demo_functions():
  """The training calls run only without TRAINED_WORKDIR (so not above): every call of a
  `phases` or `recipe` function in the notebook must at least fit that function's signature."""
  from llava_jax.demo import phases, recipe
  modules = {"phases": phases, "recipe": recipe}
  calls = []
  for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
    if cell.cell_type == "code":
      source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
      calls += [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) in modules]
  assert {"stage0", "train_stage", "finished_training"} <= {call.func.attr for call in calls}
  for call in calls:
    function = getattr(modules[call.func.value.id], call.func.attr)
    inspect.signature(function).bind(*call.args, **{k.arg: k.value for k in call.keywords})  # TypeError if not


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"
  assert "parameters" in code[0].metadata.get("tags", []), "the first code cell is the papermill parameters cell"
  assert "QUICK" in code[0].source and "TRAINED_WORKDIR" in code[0].source
  assert os.path.getsize(NOTEBOOK) < 100_000


def test_finished_training_needs_a_finished_run_with_the_same_settings(tmp_path):
  from llava_jax.demo import recipe
  from llava_jax.errors import LlavaJaxError
  with pytest.raises(LlavaJaxError, match="has not finished there"):
    recipe.finished_training(str(tmp_path), recipe.QUICK, True)
  (tmp_path / "results.json").write_text(json.dumps({"settings": recipe.settings_record(recipe.QUICK, True),
                                                     "losses": {"clip": [3.0], "lm": [4.0]}}))
  with pytest.raises(LlavaJaxError, match="other settings than quick=False"):
    recipe.finished_training(str(tmp_path), recipe.FULL, False)
  trained = recipe.finished_training(str(tmp_path), recipe.QUICK, True)
  assert trained["stage0"]["clip_losses"] == [3.0] and trained["stage2"] == str(tmp_path / "stage2")


def test_demo_refuses_a_foreign_workdir(tmp_path):
  (tmp_path / "precious.txt").write_text("not the demo's")
  proc = _cli("demo", "--workdir", str(tmp_path), "--quick", timeout=120)
  assert proc.returncode == 2
  assert "not written by `llava-jax demo`" in proc.stderr
  assert (tmp_path / "precious.txt").exists()


# ---- fast unit tests of the demo's pieces --------------------------------------------------


def test_chat_template_renders_the_training_prompt():
  from llava_jax.data import conversation, templates
  from llava_jax.demo.tokenizer import VICUNA_CHAT_TEMPLATE
  question = "What color is the star?"
  ours = conversation.render([conversation.user_turn(question, 1)], VICUNA_CHAT_TEMPLATE, "vicuna_v1",
                             special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
  assert ours == templates.generation_prompt("vicuna_v1", "<image>\n" + question)


def test_hard_negative_differs_from_the_caption():
  import numpy as np
  from llava_jax.data import shapes
  from llava_jax.demo import world
  rng = np.random.default_rng(0)
  for seed in range(20):
    _, ann = shapes.render(seed)
    assert world.hard_negative(ann, rng) != world.clip_caption(ann)


def test_clip_loss_prefers_matching_pairs():
  import jax.numpy as jnp
  from llava_jax.demo.stage0 import clip_loss
  eye = jnp.eye(4)
  matched, acc = clip_loss(eye, eye, -eye, 10.0)
  shuffled, _ = clip_loss(eye, eye[::-1], -eye, 10.0)
  assert float(acc) == 1.0 and float(matched) < 0.01 < float(shuffled)


def test_object_pooling_averages_only_the_patches_holding_objects():
  import numpy as np
  from llava_jax.demo.stage0 import object_mask, pool_patches
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 1 + 4, 3)).astype(np.float32)  # CLS + 4 patches
  mask = object_mask(np.array([[2, 0, -1], [3, -1, -1]]), 4)
  np.testing.assert_array_equal(np.asarray(mask), [[1, 0, 1, 0], [0, 0, 0, 1]])
  pooled = np.asarray(pool_patches(hidden, "objects", mask))
  np.testing.assert_allclose(pooled[0], (hidden[0, 1] + hidden[0, 3]) / 2, rtol=1e-6)
  np.testing.assert_allclose(pooled[1], hidden[1, 4], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(pool_patches(hidden, "mean")), hidden[:, 1:].mean(1), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(pool_patches(hidden, "cls")), hidden[:, 0])


def test_train_clip_refuses_an_unknown_pool_and_object_pooling_without_regions():
  import numpy as np
  from llava_jax.demo.stage0 import train_clip
  arrays = [np.zeros((2, 4), np.int32), np.zeros(2, np.int32)] * 2
  with pytest.raises(ValueError, match="expected one of"):
    train_clip(None, np.zeros((2, 8, 8, 3)), *arrays, vocab_size=8, steps=1, batch_size=2, pool="object")
  with pytest.raises(ValueError, match="needs `regions`"):
    train_clip(None, np.zeros((2, 8, 8, 3)), *arrays, vocab_size=8, steps=1, batch_size=2, pool="objects")


def test_region_targets_name_each_objects_patch_and_phrase():
  from llava_jax.demo import world
  ann = {"width": 96, "height": 96, "objects": [
      {"color": "red", "shape": "star", "size": "small", "center": [10, 10]},
      {"color": "blue", "shape": "circle", "size": "large", "center": [90, 50]}]}
  patch, phrase = world.region_targets([ann], 4)
  assert patch.tolist() == [[0, 2 * 4 + 3, -1, -1]]
  assert [world.PHRASES[i] for i in phrase[0, :2]] == ["small red star", "large blue circle"]


def test_region_loss_is_low_only_for_the_right_phrase():
  import jax.numpy as jnp
  from llava_jax.demo.stage0 import region_loss
  phrases = jnp.eye(3)  # three unit phrase embeddings
  patches = jnp.zeros((1, 4, 3)).at[0, 1].set(phrases[2])  # patch 1 holds phrase 2
  index = jnp.array([[1, -1]])  # one object (in patch 1) and an empty slot, which must not count
  right = region_loss(patches, phrases, index, jnp.array([[2, 0]]), 20.0)
  wrong = region_loss(patches, phrases, index, jnp.array([[0, 0]]), 20.0)
  assert float(right) < 1e-3 < 10.0 < float(wrong)


def test_pack_cuts_a_stream_of_documents():
  import numpy as np
  from llava_jax.demo.stage0 import pack
  rows = pack([[5, 6, 7], [8], [9, 10]], 3, eos_id=2)
  assert rows.tolist() == [[5, 6, 7], [2, 8, 2], [9, 10, 2]]


def test_accuracy_by_reference_splits_color_and_shape_by_how_the_object_is_named():
  from llava_jax.demo import evaluate, report
  colors, shapes = ["red", "blue"], ["circle", "star"]
  qa = [  # (qtype, ref, prediction, truth)
      ("color", {"shape": "star"}, "The star is red.", "red"),
      ("color", {"shape": "circle"}, "The circle is red.", "blue"),
      ("color", {"size": "small", "shape": "star"}, "The small star is blue.", "blue"),
      ("shape", {"size": "large", "color": "red"}, "A large red circle.", "star"),
      ("existence", {}, "Yes.", "yes")]
  questions = [{"qtype": t, "args": {"ref": ref} if ref else {"color": "red", "shape": "star"}, "answer": truth,
                "choices": colors if t == "color" else shapes if t == "shape" else ["yes", "no"]}
               for t, ref, _, truth in qa]
  split = evaluate.accuracy_by_reference(questions, [p for _, _, p, _ in qa])
  assert split["color"] == {"one_attribute": {"accuracy": 0.5, "count": 2}, "with_size": {"accuracy": 1.0, "count": 1}}
  assert split["shape"]["with_size"] == {"accuracy": 0.0, "count": 1}
  assert split["shape"]["one_attribute"]["count"] == 0 and math.isnan(split["shape"]["one_attribute"]["accuracy"])
  assert "object named by one attribute 50.0% (2 questions)" in report.table(
      {"accuracy": {t: 0.5 for t in QA_TYPES}, "blind_accuracy": {t: 0.5 for t in QA_TYPES},
       "accuracy_by_reference": split, "pope": {s: dict.fromkeys(POPE_KEYS, 0.5) for s in POPE_SPLITS},
       "blind_pope": {s: dict.fromkeys(POPE_KEYS, 0.5) for s in POPE_SPLITS}, "seconds": {}, "params": {},
       "examples": []})


def test_evaluate_asks_each_distinct_prompt_once_and_scores_every_question(monkeypatch):
  from llava_jax.data import shapes
  from llava_jax.demo import evaluate
  test = [shapes.render(seed)[1] for seed in range(2_000_000_000, 2_000_000_012)]
  for ann in test:
    ann["image"] = f"{ann['id']}.png"
  sets = evaluate.questions(test)
  truth = {}
  for qs in sets.values():
    for q in qs:
      truth[(q["question"], q["image"])] = q["answer"]
  asked = []

  class FakeAsker:  # answers the truth when it sees the image, "no" blind
    def __init__(self, *args):
      pass

    def ask(self, items, progress=None):
      asked.extend(items)
      progress(len(items))
      return ["no" if image is None else truth[(question, image)] for question, image in items]

  monkeypatch.setattr(evaluate, "Asker", FakeAsker)
  done = []
  r = evaluate.evaluate(None, "folder", sets, progress=done.append)
  n_questions = 2 * sum(len(qs) for qs in sets.values())  # each with its image and blind
  assert len(asked) == len(set(asked)) == sum(done) == len(evaluate.distinct_prompts(sets)) < n_questions
  assert all(v == 1.0 for v in r["accuracy"].values()) and all(m["f1"] == 1.0 for m in r["pope"].values())
  assert all(m["f1"] == 0.0 and m["yes_ratio"] == 0.0 for m in r["blind_pope"].values())
  blind_existence = [q["answer"] == "no" for q in sets["qa"] if q["qtype"] == "existence"]
  assert r["blind_accuracy"]["existence"] == sum(blind_existence) / len(blind_existence)
