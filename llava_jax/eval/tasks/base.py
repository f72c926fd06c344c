"""What every benchmark task is made of, and reading LLaVA's evaluation files.

A task reads its questions from its folder under --data (LLaVA's playground/data/eval layout, see
LLaVA's docs/Evaluation.md), turns each into a `Question` (the user message as LLaVA-1.5 asked it,
one image, and what its scorer needs), and scores the answers with the scorers of llava_jax.eval.
Another input format (e.g. lmms-lab's parquet exports) is another `questions` reader producing the
same Questions; the runner and the scorers do not change.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from llava_jax.errors import LlavaJaxError
from llava_jax.fileio import read_json

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Question:
  qid: str  # unique within its task; the key of the answers file
  text: str  # the user message (no image tag: the conversation template places the image)
  image: str | bytes | None  # image file, or its encoded bytes (MMBench's TSV), or None: a text-only question
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # what the scorer needs


class Task:
  """One benchmark. Subclasses set the class attributes and implement `questions` and `score`."""
  name: str
  folder: str  # under --data
  label: str  # its column in the printed table (the LLaVA-1.5 results table's name)
  max_new_tokens = 128  # LLaVA's model_vqa_loader.py default
  reference = ""  # the official scorer this task's `score` follows

  def questions(self, root: str) -> list[Question]:
    raise NotImplementedError

  def score(self, root: str, questions: Sequence[Question], answers: Mapping[str, str]) -> dict:
    """Metrics of `answers` (qid -> reply) to `questions`; {} when the folder has no ground truth."""
    raise NotImplementedError

  def headline(self, metrics: Mapping) -> float | None:
    """The number the LLaVA papers' results table reports for this task (None: not scored)."""
    return None

  def write_submission(self, questions: Sequence[Question], answers: Mapping[str, str], out_dir: str) -> str | None:
    """Writes the benchmark server's submission file under out_dir (path returned); most tasks have none."""
    return None

  def path(self, root: str, *parts: str) -> str:
    return os.path.join(root, self.folder, *parts)


def with_suffix(text: str, suffix: str) -> str:
  """The question with LLaVA-1.5's answer-format instruction on its own line, unless the question
  file already carries it (LLaVA's own .jsonl files do)."""
  text = text.strip()
  return text if suffix in text else f"{text}\n{suffix}"


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a .jsonl file; LlavaJaxError naming the file (and line) when missing or malformed."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise LlavaJaxError(f"{path}: no such file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise LlavaJaxError(f"{path}: cannot read ({e})") from None
  rows = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise LlavaJaxError(f"{path}:{n}: invalid JSON ({e})") from None
    if not isinstance(row, dict):
      raise LlavaJaxError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    rows.append(row)
  return rows


def field(row: Mapping, key: str, where: str):
  """row[key], or a LlavaJaxError naming the file and the missing key."""
  if key not in row:
    raise LlavaJaxError(f"{where}: missing key {key!r}")
  return row[key]


def llava_questions(path: str, image_folder: str, suffix: str | None, meta_keys: Sequence[str] = ()) -> list[Question]:
  """Questions of one of LLaVA's question .jsonl files ({"question_id", "image", "text", ...}): the image
  under `image_folder`, the text with `suffix`, and the `meta_keys` present carried to the scorer."""
  out = []
  for n, row in enumerate(read_jsonl(path), 1):
    where = f"{path}:{n}"
    text = str(field(row, "text", where))
    image = row.get("image")
    out.append(Question(str(field(row, "question_id", where)), with_suffix(text, suffix) if suffix else text,
                        os.path.join(image_folder, image) if image else None,
                        {k: row[k] for k in meta_keys if k in row}))
  return out


def optional_json(path: str, expect: type = dict):
  """A ground-truth file that may be absent (test splits): its value, or None."""
  return read_json(path, expect) if os.path.exists(path) else None

