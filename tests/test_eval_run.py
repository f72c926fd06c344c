"""`llava-jax eval` end to end: every task on tiny LLaVA-layout folders, scored against hand-computed numbers
(a scripted model), bad input, and the real tiny model (batched = one by one; resume after SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
import time

import openpyxl
import pytest

import eval_fixtures
from eval_fixtures import eval_cli_error, use_scripted_session
from hf_fixtures import save_tiny_hf_folder
from llava_jax.eval import processes, runner
from llava_jax.eval.tasks import TASKS, Question

ALL = ",".join(TASKS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return eval_fixtures.build(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return save_tiny_hf_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture
def scripted(monkeypatch):
  return use_scripted_session(monkeypatch)


def test_every_task_scored_by_hand(data, model, scripted, tmp_path, capsys):
  out = tmp_path / "out"
  results = runner.eval_command(str(model), ALL, str(data), str(out), batch_size=3)
  assert set(scripted.batches) == {3}  # every batch padded to one shape
  assert results == json.loads((out / "results.json").read_text())
  r = {k: {m: v for m, v in results[k].items() if m not in ("scorer", "submission")} for k in TASKS}
  assert r["pope"] == {
      "random": {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "yes_ratio": 1.0},
      "adversarial": {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0},
      "questions": 4, "answered": 4, "skipped": 0}
  assert r["mme"]["perception"] == 200.0 and r["mme"]["cognition"] == 50.0
  assert r["mme"]["subtasks"]["code_reasoning"] == {"accuracy": 50.0, "accuracy_plus": 0.0, "score": 50.0}
  assert r["gqa"] == {"accuracy": pytest.approx(1 / 3), "scored": 3, "questions": 4, "answered": 3, "skipped": 1,
                      "skipped_ids": ["g4"]}
  assert r["textvqa"]["accuracy"] == pytest.approx((0.6 + 1.0) / 2)
  assert r["vizwiz"]["accuracy"] == 1.0
  assert r["scienceqa_img"] == {"accuracy": 0.5, "scored": 2, "questions": 2, "answered": 2, "skipped": 0}
  assert r["mmbench"] == {"accuracy": 0.5, "by_category": {"animals": 1.0, "counting": 0.0}, "single_round": 1.0,
                          "scored": 2, "questions": 5, "answered": 5, "skipped": 0}
  assert r["seed_image"] == {"accuracy": 0.5, "by_category": {"Instance Attributes": 1.0, "Scene Understanding": 0.0},
                             "scored": 2, "questions": 2, "answered": 2, "skipped": 0}
  assert r["vqav2"] == {"questions": 1, "answered": 1, "skipped": 0}
  assert r["llava_bench"] == {"questions": 3, "answered": 3, "skipped": 0}  # no --judge-url: answers only
  assert r["mm_vet"] == {"questions": 2, "answered": 2, "skipped": 0}
  assert json.loads((out / "vqav2" / "submission.json").read_text()) == [{"question_id": 7, "answer": "2"}]
  assert json.loads((out / "vizwiz" / "submission.json").read_text()) == [
      {"image": "VizWiz_val_1.png", "answer": "unanswerable"}]
  assert json.loads((out / "mm_vet" / "submission.json").read_text()) == {"v1_0": "Hello.", "v1_1": "x = -1"}
  sheet = openpyxl.load_workbook(out / "mmbench" / "submission.xlsx").active
  assert [[c or "" for c in row] for row in sheet.iter_rows(values_only=True)] == [
      ["index", "question", "A", "B", "C", "D", "prediction", "answer"],
      ["1", "Which animal barks?", "cat", "dog", "cow", "", "B", "B"],
      ["2", "Pick the first.", "one", "two", "", "", "A", "A"]]
  assert results["run"]["model"] == os.path.realpath(model) and results["run"]["config"]["model_type"] == "llava"
  # The prompts: LLaVA-1.5's suffixes, added once.
  assert "Is it sunny?\nAnswer the question using a single word or phrase." in scripted.texts
  assert scripted.texts.count("Is there a tree in this image? Please answer yes or no.\n"
                              "Answer the question using a single word or phrase.") == 1
  assert ("Which animal barks?\nA. dog\nB. cow\nC. cat\nAnswer with the option's letter from the given choices "
          "directly.") in scripted.texts
  table = capsys.readouterr().out.splitlines()
  assert table[0] == "| VQAv2 | GQA | VizWiz | SQA-IMG | TextVQA | POPE | MME | MMB | SEED-I | LLaVA-W | MM-Vet |"
  assert table[2] == "| - | 33.3 | 100.0 | 50.0 | 80.0 | 33.3 | 200.0 | 50.0 | 50.0 | - | - |"


def _without_submissions(results: dict) -> dict:
  """The results but the submission files' paths (under each run's own --out)."""
  return {t: {k: v for k, v in r.items() if k != "submission"} for t, r in results.items() if t != "run"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  return eval_fixtures.build_exports(tmp_path_factory.mktemp("exports"))


def test_lmms_lab_exports_score_as_the_llava_layout(data, exports, model, scripted, tmp_path):
  """The same questions as lmms-lab's parquet / save_to_disk exports: the same prompts, the same metrics."""
  from_llava = runner.eval_command(str(model), ALL, str(data), str(tmp_path / "llava"), batch_size=3)
  llava_prompts = sorted(scripted.texts)
  scripted.texts.clear()
  from_exports = runner.eval_command(str(model), ALL, str(exports), str(tmp_path / "exports"), batch_size=3)
  assert sorted(scripted.texts) == llava_prompts
  assert _without_submissions(from_exports) == _without_submissions(from_llava)
  for sub in ("vqav2/submission.json", "mm_vet/submission.json"):
    assert (tmp_path / "exports" / sub).read_text() == (tmp_path / "llava" / sub).read_text()
  assert json.loads((tmp_path / "exports" / "vizwiz" / "submission.json").read_text()) == [
      {"image": "VizWiz_val_1.jpg", "answer": "unanswerable"}]  # lmms-lab's question_id is the image less .jpg
  sheets = [list(openpyxl.load_workbook(tmp_path / out / "mmbench" / "submission.xlsx").active.values)
            for out in ("llava", "exports")]
  assert sheets[0] == sheets[1]


def test_rerun_asks_nothing_and_extends_results(data, model, scripted, tmp_path):
  out = tmp_path / "out"
  first = runner.eval_command(str(model), "gqa", str(data), str(out), batch_size=2, limit=2)
  assert first["gqa"]["questions"] == 2 and scripted.batches == [2]
  again = runner.eval_command(str(model), "gqa,pope", str(data), str(out), batch_size=2, limit=2)
  assert scripted.batches == [2, 2]  # only pope's two questions were asked
  assert again["gqa"] == first["gqa"] and again["pope"]["answered"] == 2
  lines = (out / "gqa" / "answers.jsonl").read_text().splitlines()
  assert [json.loads(l)["question_id"] for l in lines] == ["g1", "g2"]


def test_without_answer_format_the_questions_are_asked_as_written(data, model, scripted, tmp_path):
  results = runner.eval_command(str(model), "gqa,mme", str(data), str(tmp_path / "out"), limit=2, answer_format=False)
  # LLaVA's MME file carries the suffix on one question: it goes too; MME's own "Please answer yes or no." stays.
  assert sorted(scripted.texts) == ["Is it sunny?", "Is there a boat in this image? Please answer yes or no.",
                                    "Is there a tree in this image? Please answer yes or no.",
                                    "Which side is the cup on?"]
  assert results["run"]["settings"]["answer_format"] is False


def test_bad_input_exits_2_naming_it(data, model, tmp_path, capsys):
  common = ["--model", str(model), "--out", str(tmp_path / "out")]
  assert "unknown task 'vqa3'" in eval_cli_error(capsys, *common, "--data", str(data), "--task", "pope,vqa3")
  empty = tmp_path / "empty"
  empty.mkdir()
  assert f"{empty}/gqa/llava_gqa_testdev_balanced.jsonl: no such file" in eval_cli_error(
      capsys, *common, "--data", str(empty), "--task", "gqa")
  bad = tmp_path / "bad"
  (bad / "pope").mkdir(parents=True)
  (bad / "pope" / "llava_pope_test.jsonl").write_text(
      '{"question_id": 1, "image": "a.png", "text": "q"}\n{"question_id": 2,\n')
  assert f"{bad}/pope/llava_pope_test.jsonl:2: invalid JSON" in eval_cli_error(
      capsys, *common, "--data", str(bad), "--task", "pope")
  (bad / "pope" / "llava_pope_test.jsonl").write_text('{"question_id": 1, "image": "a.png"}\n')
  assert "llava_pope_test.jsonl:1: missing key 'text'" in eval_cli_error(
      capsys, *common, "--data", str(bad), "--task", "pope")
  export = tmp_path / "export"
  eval_fixtures.write_export(export, "test", [{"question_id": "1", "question": "Is it?", "answer": "yes"}])
  assert f"{export}: row 0 has no column 'category'" in eval_cli_error(capsys, *common, "--data", str(export), "--task",
                                                                   "pope")
  assert f"{export} is one lmms-lab export: --task names one task" in eval_cli_error(
      capsys, *common, "--data", str(export), "--task", "pope,mme")


def test_answers_of_another_model_or_task_are_refused(data, model, tmp_path, capsys):
  out = tmp_path / "out"
  answers = out / "pope" / "answers.jsonl"
  answers.parent.mkdir(parents=True)
  row = {"question_id": 0, "prompt": "p", "text": "yes", "task": "pope", "model_id": "/elsewhere/model"}
  answers.write_text(json.dumps(row) + "\n")
  args = ["--model", str(model), "--data", str(data), "--out", str(out), "--task", "pope"]
  assert f"{answers}: answers of model /elsewhere/model" in eval_cli_error(capsys, *args)
  answers.write_text(json.dumps(dict(row, task="gqa", model_id=os.path.realpath(model))) + "\n")
  assert f"{answers}: answers of task 'gqa', not 'pope'" in eval_cli_error(capsys, *args)
  answers.unlink()
  (out / "results.json").write_text(json.dumps({"run": {"model": "/elsewhere/model"}}))
  assert f"{out}/results.json: results of model /elsewhere/model" in eval_cli_error(capsys, *args)


def test_vqav2_scored_when_annotations_exist(tmp_path):
  (tmp_path / "vqav2").mkdir()
  (tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
      {"question_id": 1, "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7},
      {"question_id": 2, "answers": [{"answer": "yes"}] * 10}]}))
  task = TASKS["vqav2"]
  questions = [Question("1", "How many?", "a.png"), Question("2", "Is it?", "a.png"), Question("3", "Why?", "a.png")]
  # Question 1: 3 humans said "2" (leaving one of them out: 2/3; leaving out another: 1); question 3 has no annotation.
  expected = (3 * (2 / 3) + 7 * 1) / 10
  assert task.score(str(tmp_path), questions, {"1": "two", "2": "no", "3": "because"}) == {
      "accuracy": pytest.approx((expected + 0.0) / 2), "scored": 2}


# ---- the real tiny model ----------------------------------------------------------------------

MAX_NEW = 4
BATCH = 2


@pytest.fixture(scope="module")
def pope16(tmp_path_factory):
  """A POPE folder of 16 questions on 2 images."""
  root = tmp_path_factory.mktemp("pope16")
  objects = ["dog", "cat", "car", "bus", "cup", "tree", "boat", "bird"]
  rows = [{"question_id": i, "image": f"{i % 2}.png", "text": f"Is there a {o} in the image?",
           "category": "random"} for i, o in enumerate(objects * 2)]
  (root / "pope" / "val2014").mkdir(parents=True)
  (root / "pope" / "coco").mkdir()
  (root / "pope" / "llava_pope_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "pope" / "coco" / "coco_pope_random.json").write_text(
      "".join(json.dumps({"label": "yes" if i % 3 else "no"}) + "\n" for i in range(16)))
  for i in range(2):
    (root / "pope" / "val2014" / f"{i}.png").write_bytes(eval_fixtures.png(i + 1))
  return root


@pytest.fixture(scope="module")
def uninterrupted(model, pope16, tmp_path_factory):
  out = tmp_path_factory.mktemp("ref") / "out"
  runner.eval_command(str(model), "pope", str(pope16), str(out), batch_size=BATCH, max_new_tokens=MAX_NEW)
  return out


def test_batched_answers_equal_one_by_one(model, pope16, uninterrupted):
  from PIL import Image
  from llava_jax.infer.generate import Prompt
  from llava_jax.infer.run import load_session
  from llava_jax.infer.sampling import SamplingParams
  session = load_session(str(model))
  rows = [json.loads(l) for l in (uninterrupted / "pope" / "answers.jsonl").read_text().splitlines()]
  assert [r["question_id"] for r in rows] == [str(i) for i in range(16)]
  for r in rows[:2]:  # one of each image
    image = Image.open(pope16 / "pope" / "val2014" / f"{int(r['question_id']) % 2}.png")
    prompt = Prompt.of(session.processor.prepare(r["prompt"], [image]))
    alone = session.engine.generate([prompt], MAX_NEW, SamplingParams())[0]
    assert session.processor.decode(alone.tokens).strip() == r["text"]
  assert any(r["text"] for r in rows)  # the comparison means something only if text was produced


def test_every_task_runs_on_the_tiny_model_in_both_formats(data, exports, model, tmp_path):
  """A real tiny model through all 11 tasks: every usable question answered, and the same questions from
  lmms-lab's exports get the same greedy answers and metrics as from LLaVA's layout."""
  results = {name: runner.eval_command(str(model), ALL, str(root), str(tmp_path / name), batch_size=BATCH,
                                       max_new_tokens=MAX_NEW) for name, root in (("llava", data), ("exports", exports))}
  for task in TASKS:
    counts = results["llava"][task]
    assert counts["answered"] > 0 and counts["answered"] + counts["skipped"] == counts["questions"], task
  def answers(name, task):
    rows = [json.loads(l) for l in (tmp_path / name / task / "answers.jsonl").read_text().splitlines()]
    return sorted((r["prompt"], r["text"]) for r in rows)  # ids may differ by format (VizWiz's)
  for task in TASKS:
    assert answers("exports", task) == answers("llava", task), task
  assert _without_submissions(results["exports"]) == _without_submissions(results["llava"])


def test_rerun_after_sigkill_gives_the_same_results(model, pope16, uninterrupted, tmp_path):
  out = tmp_path / "out"
  answers = out / "pope" / "answers.jsonl"
  # The same flags (and XLA flags) as the uninterrupted run: its compiled programs come from the persistent cache.
  proc = subprocess.Popen(
      [sys.executable, "-m", "llava_jax", "eval", "--model", str(model), "--task", "pope", "--data", str(pope16),
       "--out", str(out), "--batch-size", str(BATCH), "--max-new-tokens", str(MAX_NEW)],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not (answers.exists() and answers.read_text().count("\n") >= 1) and proc.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  written = answers.read_text().count("\n")
  assert 1 <= written < 16, f"the run was not killed mid-task ({written} answers)"
  resumed = runner.eval_command(str(model), "pope", str(pope16), str(out), batch_size=BATCH, max_new_tokens=MAX_NEW)
  rows = [json.loads(l) for l in answers.read_text().splitlines()]
  assert sorted(int(r["question_id"]) for r in rows) == list(range(16))  # none asked twice
  assert resumed == json.loads((uninterrupted / "results.json").read_text())
  assert (out / "results.json").read_text() == (uninterrupted / "results.json").read_text()


def test_answers_file_drops_a_torn_last_line_and_refuses_a_bad_one(tmp_path):
  from llava_jax.errors import LlavaJaxError
  from llava_jax.eval.answers import AnswersFile
  answers = AnswersFile(str(tmp_path / "pope" / "answers.jsonl"), "pope", "/m")
  answers.append([("1", "p1", "yes"), ("2", "p2", "no")])
  with open(answers.path, "a") as f:
    f.write('{"question_id": "3", "prompt": "p3", "te')  # a write cut by SIGKILL
  assert answers.load() == {"1": "yes", "2": "no"}
  answers.append([("3", "p3", "yes")])
  assert answers.load() == {"1": "yes", "2": "no", "3": "yes"}
  with open(answers.path, "a") as f:
    f.write("garbage\n")
  with pytest.raises(LlavaJaxError, match="answers.jsonl:4: not an answers line"):
    answers.load()


def test_questions_split_over_processes_then_resumed_by_one(data, model, scripted, tmp_path):
  """Process 1 of 2 answers its share and leaves results.json to process 0; process 0 (run after it here, so it
  sees those answers and splits what is left) answers its share of the rest and scores everything written; a
  one-process rerun asks the remaining questions: every question asked once, the results of one process."""
  tasks = "pope,mme,mmbench,textvqa"
  alone = runner.eval_command(str(model), tasks, str(data), str(tmp_path / "alone"), batch_size=2)
  asked_alone = sorted(scripted.texts)
  scripted.texts.clear()
  out = tmp_path / "split"
  assert runner.eval_command(str(model), tasks, str(data), str(out), batch_size=2, share=processes.Share(1, 2)) is None
  assert not (out / "results.json").exists()
  ids = lambda f: [json.loads(l)["question_id"] for l in (out / "pope" / f).read_text().splitlines()]
  assert ids("answers.1.jsonl") == ["1", "3"]  # every 2nd question from the 2nd
  partial = runner.eval_command(str(model), tasks, str(data), str(out), batch_size=2, share=processes.Share(0, 2))
  assert ids("answers.0.jsonl") == ["0"]  # of the rest, 0 and 2: the 1st
  assert partial["pope"]["answered"] == 3 and partial == json.loads((out / "results.json").read_text())
  final = runner.eval_command(str(model), tasks, str(data), str(out), batch_size=2)
  assert ids("answers.jsonl") == ["2"]
  assert sorted(scripted.texts) == asked_alone  # each question once
  assert final == json.loads((out / "results.json").read_text())
  assert _without_submissions(final) == _without_submissions(alone)


def test_two_processes_split_the_questions_and_write_one_results(model, pope16, uninterrupted, tmp_path):
  out, logs = tmp_path / "out", tmp_path / "logs"
  command = [os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch", "local_multiprocess.sh"), "2",
             "--devices", "1", sys.executable, "-m", "llava_jax", "eval", "--model", str(model), "--task", "pope",
             "--data", str(pope16), "--out", str(out), "--batch-size", str(BATCH), "--max-new-tokens", str(MAX_NEW)]
  done = subprocess.run(command, env=dict(os.environ, QUIET="1", LOG_DIR=str(logs)), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, "\n".join(p.read_text()[-2000:] for p in sorted(logs.iterdir()))
  ids = lambda f: sorted(int(json.loads(l)["question_id"]) for l in (out / "pope" / f).read_text().splitlines())
  assert ids("answers.0.jsonl") == list(range(0, 16, 2)) and ids("answers.1.jsonl") == list(range(1, 16, 2))
  assert (out / "results.json").read_text() == (uninterrupted / "results.json").read_text()
  assert "| POPE |" in (logs / "process_0.log").read_text() and "| POPE |" not in (logs / "process_1.log").read_text()
