"""`llava-jax eval`: a model folder + benchmark tasks -> OUT/TASK/answers.jsonl, OUT/results.json, a table.

LLaVA-1.5's protocol: every question is one user turn of the model's conversation template (its image
first), answered by greedy decoding; each task's prompt suffix and scorer are in its class docstring
(llava_jax/eval/tasks/). All questions are read and checked, and answers files matched to this model,
before any weights load; questions are then asked in batches of --batch-size, each batch one compiled
engine program (the last one padded to the same shape), and every batch's answers are appended to the
task's answers file before the next is asked, so a rerun resumes and never asks a question twice. In a
multi-process job each process asks its share of the questions (llava_jax.eval.processes).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

from llava_jax.data import images as images_lib
from llava_jax.errors import LlavaJaxError
from llava_jax.eval import processes
from llava_jax.eval.answers import AnswersFile
from llava_jax.eval.judge import JudgeClient, JudgedTask, judge_task
from llava_jax.eval.tasks import Question, Task, parse_tasks
from llava_jax.eval.tasks.exports import is_export
from llava_jax.fileio import read_json, write_json_atomic

RESULTS = "results.json"


@dataclasses.dataclass
class TaskRun:
  task: Task
  questions: list[Question]
  answers_file: AnswersFile  # this process's
  answers: dict[str, str]  # qid -> text, those already written (by any process) included
  mine: list[Question]  # the questions this process asks
  skipped: list[str] = dataclasses.field(default_factory=list)  # questions whose image could not be used


def eval_command(model: str, task_names: str, data: str, out: str, batch_size: int = 8, limit: int | None = None,
                 max_new_tokens: int | None = None, mesh=None, judge: JudgeClient | None = None,
                 log: IO[str] = sys.stderr, share: processes.Share | None = None,
                 answer_format: bool = True, dtype: str = "auto") -> dict | None:
  """Runs the tasks and returns the results (also written to OUT/results.json); with `judge`, the judged tasks'
  answers are also judged. In a multi-process job (`share`: this process's, by default from JAX) only process 0
  scores (and judges) and returns them, the others return None. Without `answer_format` the questions are asked
  without LLaVA-1.5's answer-format instruction (for models not trained with it, e.g. the demo's)."""
  share = share or processes.current()
  tasks = parse_tasks(task_names)
  for flag, value in (("--batch-size", batch_size), ("--limit", limit), ("--max-new-tokens", max_new_tokens)):
    if value is not None and value < 1:
      raise LlavaJaxError(f"{flag} must be >= 1, got {value}")
  if not os.path.isdir(data):
    raise LlavaJaxError(f"{data}: no such data folder")
  if len(tasks) > 1 and is_export(data, configs=False):
    raise LlavaJaxError(f"{data} is one lmms-lab export: --task names one task for it")
  model_id = os.path.realpath(model)
  model_config = _model_config(model)  # a missing model fails here, before any work
  results_path = os.path.join(out, RESULTS)
  results = read_json(results_path) if os.path.exists(results_path) else {}
  if results.get("run", {}).get("model", model_id) != model_id:  # one folder, one model: results are merged
    raise LlavaJaxError(f"{results_path}: results of model {results['run']['model']}, not {model_id}; "
                        "use another --out")
  runs = []
  for task in tasks:
    questions = task.questions(data)[:limit]
    if not answer_format and task.suffix:
      questions = [dataclasses.replace(q, text=q.text.removesuffix(task.suffix).rstrip()) for q in questions]
    if not questions:
      raise LlavaJaxError(f"{task.path(data)}: no {task.name} questions")
    twice = next((qid for qid, n in collections.Counter(q.qid for q in questions).items() if n > 1), None)
    if twice is not None:
      raise LlavaJaxError(f"{task.path(data)}: question_id {twice!r} is used twice in {task.name}'s questions")
    folder = os.path.join(out, task.name)
    answers = _written(folder, task.name, model_id)
    pending = [q for q in questions if q.qid not in answers]
    runs.append(TaskRun(task, questions, AnswersFile(share.answers_path(folder), task.name, model_id), answers,
                        share.mine(pending)))
    if judge is not None and isinstance(task, JudgedTask):
      task.judge_references(data, questions)  # the judge's files are checked before any weights load
  processes.barrier(share, "answers-read")  # before any process appends to its file
  if any(run.mine for run in runs):
    from llava_jax.infer.run import load_session
    session = load_session(model, mesh, dtype=dtype)
    for run in runs:
      _ask(session, run, batch_size, max_new_tokens or run.task.max_new_tokens, log)
  processes.barrier(share, "answered")
  for run in runs:
    run.skipped = processes.gather(share, run.skipped)
  if not share.writes_results:
    return None
  for run in runs:
    run.answers = _written(os.path.join(out, run.task.name), run.task.name, model_id)
  results["run"] = {"model": model_id, "config": model_config, "commit": _commit(),
                    "settings": {"batch_size": batch_size, "limit": limit, "max_new_tokens": max_new_tokens,
                                 "answer_format": answer_format, "decoding": "greedy"}}
  for run in runs:
    results[run.task.name] = _score(run, data, out, judge, log)
  write_json_atomic(results, results_path)
  print(table(tasks, results), file=sys.stdout)
  return results


def _written(task_folder: str, task: str, model_id: str) -> dict[str, str]:
  """qid -> answer of every answers file of the task (each process's)."""
  answers = {}
  for path in processes.answers_paths(task_folder):
    for qid, text in AnswersFile(path, task, model_id).load().items():
      answers.setdefault(qid, text)
  return answers


def _ask(session, run: TaskRun, batch_size: int, max_new_tokens: int, log: IO[str]) -> None:
  from llava_jax.infer.sampling import SamplingParams
  pending, name = run.mine, run.task.name
  chunks = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
  start, asked, answered_before = time.perf_counter(), 0, len(run.answers)
  # The next batch's images are decoded and preprocessed on a thread while the device answers this one. The
  # tokenizer is used under a lock: a fast tokenizer shared by two threads can fail ("Already borrowed").
  tokenizer_lock = threading.Lock()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    upcoming = pool.submit(_prompts, session, run, chunks[0], tokenizer_lock, log) if chunks else None
    for k in range(len(chunks)):
      batch = upcoming.result()
      if k + 1 < len(chunks):
        upcoming = pool.submit(_prompts, session, run, chunks[k + 1], tokenizer_lock, log)
      if not batch:
        continue
      prompts = [p for _, p in batch]
      prompts += [prompts[-1]] * (batch_size - len(prompts))  # one batch shape, one compiled program
      completions = session.engine.generate(prompts, max_new_tokens, SamplingParams())
      with tokenizer_lock:
        rows = [(q.qid, q.text, session.processor.decode(c.tokens).strip()) for (q, _), c in zip(batch, completions)]
      run.answers_file.append(rows)
      run.answers.update((qid, text) for qid, _, text in rows)
      asked += len(rows)
      print(f"llava-jax eval: {name}: {answered_before + asked}/{len(run.questions)} answered, "
            f"{asked / (time.perf_counter() - start):.2f} questions/s", file=log, flush=True)


def _prompts(session, run: TaskRun, questions: Sequence[Question], tokenizer_lock: threading.Lock,
             log: IO[str]) -> list:
  """(question, engine Prompt) of the questions whose image can be used; the others are counted skips."""
  from llava_jax.infer.generate import Prompt
  out = []
  for q in questions:
    try:
      images = [images_lib.load_image(q.image_source())] if q.image is not None else []
      with tokenizer_lock:
        inputs = session.processor.prepare(q.text, images, names=[_image_name(q)] * len(images))
      out.append((q, Prompt.of(inputs)))
    except LlavaJaxError as e:  # one bad image costs one question, counted in results.json
      run.skipped.append(q.qid)
      print(f"llava-jax eval: {run.task.name}: skipped question {q.qid}: {' '.join(str(e).split())}", file=log)
  return out


def _image_name(q: Question) -> str:
  return q.image_file() or f"the image of question {q.qid}"


def _score(run: TaskRun, data: str, out: str, judge: JudgeClient | None, log: IO[str]) -> dict:
  """The task's metrics and counts: questions, answered, skipped (unusable images; ids listed)."""
  answers = {q.qid: run.answers[q.qid] for q in run.questions if q.qid in run.answers}
  result = dict(run.task.score(data, run.questions, answers))
  if judge is not None and isinstance(run.task, JudgedTask):
    result.update(judge_task(run.task, data, run.questions, answers, judge, os.path.join(out, run.task.name), log))
  submission = run.task.write_submission(run.questions, answers, os.path.join(out, run.task.name))
  if submission:
    result["submission"] = submission
  result.update(questions=len(run.questions), answered=len(answers), skipped=len(run.skipped),
                scorer=run.task.reference)
  if run.skipped:
    result["skipped_ids"] = run.skipped
  return result


def table(tasks: Sequence[Task], results: dict) -> str:
  """The tasks' headline numbers as a row of the LLaVA-1.5 results table (markdown)."""
  cells = []
  for task in tasks:
    value = task.headline(results[task.name])
    cells.append("-" if value is None else f"{value:.1f}")
  header = "| " + " | ".join(t.label for t in tasks) + " |"
  return "\n".join([header, "|" + "---|" * len(tasks), "| " + " | ".join(cells) + " |"])


def _model_config(model: str) -> dict:
  """The model's config.json (its HF form), read without loading weights."""
  from llava_jax.weights.model_folder import detect_format
  folder = os.path.join(model, "model") if detect_format(model) == "workdir" else model
  return read_json(os.path.join(folder, "config.json"))


def _commit() -> str | None:
  """The llava-jax git commit evaluated (None outside a git checkout)."""
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
