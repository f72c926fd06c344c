"""What every benchmark task is made of, and reading LLaVA's evaluation files.

A task reads its questions from its folder under --data (LLaVA's playground/data/eval layout, see
LLaVA's docs/Evaluation.md), turns each into a `Question` (the user message as LLaVA-1.5 asked it,
one image, and what its scorer needs), and scores the answers with the scorers of llava_jax.eval.
lmms-lab's parquet/arrow exports (llava_jax.eval.tasks.exports) are the other input format: `read_export`
produces the same Questions, their ground truth carried in `meta["truth"]`; the runner and the scorers do not
change.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from llava_jax.errors import LlavaJaxError
from llava_jax.eval.tasks.exports import RowImage, is_export
from llava_jax.fileio import read_json

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Question:
  qid: str  # unique within its task; the key of the answers file
  text: str  # the user message (no image tag: the conversation template places the image)
  # image file, its encoded bytes (MMBench's TSV), an export's image cell, or None: a text-only question
  image: str | bytes | RowImage | None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # what the scorer needs

  def image_source(self) -> str | bytes | None:
    """What images.load_image reads: a file or the encoded bytes."""
    return self.image.read() if isinstance(self.image, RowImage) else self.image

  def image_file(self) -> str | None:
    """The image's file name (path in LLaVA's layout), where it has one."""
    return self.image.name if isinstance(self.image, RowImage) else self.image if isinstance(self.image, str) else None


class Task:
  """One benchmark. Subclasses set the class attributes and implement `read_llava`, `read_export` and `score`."""
  name: str
  folder: str  # under --data
  label: str  # its column in the printed table (the LLaVA-1.5 results table's name)
  export: str  # lmms-lab's dataset of it (lmms-lab/POPE: "POPE"), its folder name under --data
  suffix: str | None = None  # LLaVA-1.5's answer-format instruction after each question (None: asked as is)
  max_new_tokens = 128  # LLaVA's model_vqa_loader.py default
  reference = ""  # the official scorer this task's `score` follows

  def questions(self, root: str) -> list[Question]:
    """The questions of the export found under `root` (see export_folder), else of LLaVA's layout."""
    folder = self.export_folder(root)
    return self.read_export(folder) if folder else self.read_llava(root)

  def export_folder(self, root: str) -> str | None:
    """root/EXPORT, root/FOLDER (when it holds an export rather than LLaVA's files) or root itself (one config)."""
    candidates = ((os.path.join(root, self.export), True), (self.path(root), True), (root, False))
    return next((f for f, configs in candidates if is_export(f, configs)), None)

  def read_llava(self, root: str) -> list[Question]:
    raise NotImplementedError

  def read_export(self, folder: str) -> list[Question]:
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


def export_truth(questions: Sequence[Question]) -> dict[str, Any] | None:
  """qid -> the ground truth an export's rows carried (meta["truth"]); None where there is none (LLaVA's
  layout keeps it in files; test splits have none)."""
  truth = {q.qid: q.meta["truth"] for q in questions if q.meta.get("truth") is not None}
  return truth or None


def optional_json(path: str, expect: type = dict):
  """A ground-truth file that may be absent (test splits): its value, or None."""
  return read_json(path, expect) if os.path.exists(path) else None

