"""TASK/answers.jsonl: the model's answers, one JSON line per question, appended batch by batch.

Each line is LLaVA's answers-file row ({"question_id", "prompt", "text"}) plus the task and the model
that answered, so a rerun resumes with the questions not yet answered and refuses a file written for
another task or model. Lines are flushed and fsynced per batch; a run killed mid-write leaves at most
a torn last line, which the next run drops (that question is asked again, once).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from llava_jax.errors import LlavaJaxError


class AnswersFile:
  def __init__(self, path: str, task: str, model_id: str):
    self.path, self.task, self.model_id = path, task, model_id

  def load(self) -> dict[str, str]:
    """question_id -> answer text of the lines written so far (a torn last line is cut off the file)."""
    answers = {}
    for n, line in enumerate(whole_lines(self.path), 1):
      try:
        row = json.loads(line)
        qid, text, task, model = row["question_id"], row["text"], row["task"], row["model_id"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise LlavaJaxError(f"{self.path}:{n}: not an answers line of llava-jax eval") from None
      if task != self.task:
        raise LlavaJaxError(f"{self.path}: answers of task {task!r}, not {self.task!r}")
      if model != self.model_id:
        raise LlavaJaxError(f"{self.path}: answers of model {model}, not {self.model_id}; use another --out")
      answers.setdefault(str(qid), text)
    return answers

  def append(self, rows: Iterable[tuple[str, str, str]]) -> None:
    """Appends (question_id, prompt, text) rows and makes them durable."""
    append_lines(self.path, [json.dumps({"question_id": qid, "prompt": prompt, "text": text, "task": self.task,
                                         "model_id": self.model_id}) for qid, prompt, text in rows])


def whole_lines(path: str) -> list[str]:
  """The complete lines of an append-only .jsonl file ([] if absent); a torn last line (a write cut by a kill)
  is cut off the file, so the next append starts on a line of its own."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  whole = data[:data.rfind(b"\n") + 1]
  if len(whole) < len(data):
    with open(path, "r+b") as f:
      f.truncate(len(whole))
  return whole.decode("utf-8", errors="replace").splitlines()


def append_lines(path: str, lines: Iterable[str]) -> None:
  """Appends lines to a .jsonl file and makes them durable (flushed and fsynced)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())
