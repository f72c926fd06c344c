"""GPT-style judging of open-ended answers through any OpenAI-compatible chat-completions endpoint.

`llava-jax eval --judge-url URL --judge-model NAME [--judge-key-env VAR]` makes a `JudgeClient` (the
standard library's urllib; the API key is read from the environment, never passed as a flag, and never
printed). Each judged task (tasks/open_ended.py: LLaVA-Bench, MM-Vet) says what to ask and how to read a
reply; `judge_task` asks, retrying a reply that cannot be read up to the task's bound, and appends every
question's replies and score to OUT/TASK/judgments.jsonl before the next, so a rerun (or a run stopped by
a network error) never asks the judge about a question twice. A failed judgment is recorded as such and
counted in results.json, as LLaVA's and MM-Vet's scripts keep their -1 / 0.0 scores.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from typing import IO, Any, Mapping, Sequence

from llava_jax.errors import LlavaJaxError
from llava_jax.eval.answers import append_lines, whole_lines

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
JUDGMENTS = "judgments.jsonl"


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
  messages: tuple[Mapping[str, str], ...]  # [{"role", "content"}]
  temperature: float
  max_tokens: int


class JudgeClient:
  """POSTs chat-completion requests to URL (a base such as https://api.openai.com/v1, or the full
  .../chat/completions address) for model NAME."""

  def __init__(self, url: str, model: str, key: str | None = None, timeout: float = 120.0):
    self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
    self.model, self.timeout = model, timeout
    self._key = key  # kept out of repr and of every message

  @classmethod
  def from_flags(cls, url: str | None, model: str | None, key_env: str | None) -> "JudgeClient | None":
    """The judge the --judge-* flags ask for; None without --judge-url."""
    if url is None:
      if model is not None or key_env is not None:
        raise LlavaJaxError("--judge-model/--judge-key-env: also give --judge-url")
      return None
    if not url.startswith(("http://", "https://")):
      raise LlavaJaxError(f"--judge-url: expected an http(s) address, got {url!r}")
    if not model:
      raise LlavaJaxError("--judge-url: also give --judge-model (e.g. gpt-4-0613)")
    if key_env is not None and key_env not in os.environ:  # named explicitly: it must be there
      raise LlavaJaxError(f"--judge-key-env: environment variable {key_env} is not set")
    return cls(url, model, os.environ.get(key_env or DEFAULT_KEY_ENV))  # a local server may need no key

  def complete(self, request: JudgeRequest) -> str:
    """The reply's text; LlavaJaxError naming the endpoint when it cannot be reached or does not answer."""
    body = {"model": self.model, "messages": list(request.messages), "temperature": request.temperature,
            "max_tokens": request.max_tokens}
    headers = {"Content-Type": "application/json"}
    if self._key:
      headers["Authorization"] = f"Bearer {self._key}"
    http = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
      with urllib.request.urlopen(http, timeout=self.timeout) as response:
        reply = json.loads(response.read())
    except urllib.error.HTTPError as e:
      raise LlavaJaxError(f"judge {self.url}: HTTP {e.code} {self._redact(_error_detail(e))}") from None
    except urllib.error.URLError as e:
      raise LlavaJaxError(f"judge {self.url}: cannot connect ({e.reason})") from None
    except (TimeoutError, OSError, http.client.HTTPException) as e:
      raise LlavaJaxError(f"judge {self.url}: no reply ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise LlavaJaxError(f"judge {self.url}: the reply is not JSON") from None
    try:
      content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise LlavaJaxError(f"judge {self.url}: not a chat-completions reply (no choices[0].message.content)") from None
    return content or ""

  def _redact(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key else text


def _error_detail(e: urllib.error.HTTPError) -> str:
  """The error message of an OpenAI-style error body, else the HTTP reason (cut short: it goes on one line)."""
  try:
    detail = json.loads(e.read())["error"]["message"]
  except Exception:  # any body at all: the reason is enough
    detail = e.reason
  return " ".join(str(detail).split())[:300]


class JudgedTask:
  """What a task judged by a model provides (mixed into its Task class)."""
  judge_attempts = 3  # replies asked for one question before it counts as a failed judgment

  def judge_references(self, root: str, questions: Sequence) -> dict[str, dict]:
    """qid -> what the judge is shown besides our answer (ground truth, context); checked before any weights
    load, so a missing or malformed file fails first."""
    raise NotImplementedError

  def judge_request(self, item: Mapping[str, Any], attempt: int) -> JudgeRequest:
    """The request for one question (its references plus "answer"), attempt 0, 1, ..."""
    raise NotImplementedError

  def parse_judgment(self, reply: str):
    """The score in a reply (a JSON value), or None when it cannot be read."""
    raise NotImplementedError

  def judge_summary(self, items: Mapping[str, Mapping], scores: Mapping[str, Any]) -> dict:
    """The task's metrics from each judged question's score (None: a failed judgment)."""
    raise NotImplementedError


class JudgmentsFile:
  """OUT/TASK/judgments.jsonl: one line per judged question ({question_id, judge_model, replies, score}),
  appended and fsynced as soon as it is judged; lines of another judge model are kept but not used."""

  def __init__(self, path: str, judge_model: str):
    self.path, self.judge_model = path, judge_model

  def load(self) -> dict[str, Any]:
    scores = {}
    for n, line in enumerate(whole_lines(self.path), 1):
      try:
        row = json.loads(line)
        qid, model, score = str(row["question_id"]), row["judge_model"], row["score"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise LlavaJaxError(f"{self.path}:{n}: not a judgments line of llava-jax eval") from None
      if model == self.judge_model:
        scores.setdefault(qid, score)
    return scores

  def append(self, qid: str, replies: Sequence[str], score) -> None:
    append_lines(self.path, [json.dumps({"question_id": qid, "judge_model": self.judge_model, "replies": list(replies),
                                         "score": score})])


def judge_task(task: JudgedTask, root: str, questions: Sequence, answers: Mapping[str, str], client: JudgeClient,
               out_dir: str, log: IO[str] = sys.stderr) -> dict:
  """Judges the answered questions (cached ones are not asked again) and returns the task's judged metrics plus
  judge, judged (questions) and judge_failures (their ids listed)."""
  references = task.judge_references(root, questions)
  items = {q.qid: dict(references[q.qid], answer=answers[q.qid]) for q in questions if q.qid in answers}
  cache = JudgmentsFile(os.path.join(out_dir, JUDGMENTS), client.model)
  scores = cache.load()
  for qid, item in items.items():
    if qid in scores:
      continue
    replies, score = [], None
    for attempt in range(task.judge_attempts):
      replies.append(client.complete(task.judge_request(item, attempt)))
      score = task.parse_judgment(replies[-1])
      if score is not None:
        break
    cache.append(qid, replies, score)
    scores[qid] = score
    if score is None:
      print(f"llava-jax eval: {task.name}: the judge's replies to question {qid} could not be read "
            f"({len(replies)} tries); counted as a failed judgment", file=log)
  scores = {qid: scores[qid] for qid in items}
  failures = [qid for qid, score in scores.items() if score is None]
  result = dict(task.judge_summary(items, scores), judge=client.model, judged=len(items),
                judge_failures=len(failures))
  if failures:
    result["judge_failure_ids"] = failures
  return result
