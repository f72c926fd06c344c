"""Scoring free-form answers: normalization and exact-match accuracy per question type.

Short-answer benchmarks compare a canonical form of the model's answer with the truth: lower
case, punctuation and articles dropped, number words as digits, and only the first word kept
when the truth is one word (a model that says "Red." or "red, I think" answered "red").
A question with a closed answer set (`choices`, e.g. the color names) is scored by its decision
word instead: the first word of the answer that is one of the choices ("The star is red." ->
"red"), as multiple-choice benchmarks extract an option from free-form replies.
"""

from __future__ import annotations

import collections
import re
from typing import Iterable, Mapping, Sequence

_NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}


def words(text: str) -> list[str]:
  """Lower-case words without punctuation or articles, number words as digits."""
  tokens = re.findall(r"[a-z0-9]+", str(text).lower())
  return [_NUMBERS.get(t, t) for t in tokens if t not in _ARTICLES]


def normalize(answer: str, truth: str | None = None) -> str:
  """The canonical answer; cut to the truth's number of words when a truth is given."""
  got = words(answer)
  if truth is not None:
    got = got[:max(1, len(words(truth)))]
  return " ".join(got)


def exact_match(answer: str, truth: str) -> bool:
  return normalize(answer, truth) == normalize(truth)


def decision(answer: str, choices: Sequence[str]) -> str:
  """The first word of `answer` that is one of `choices` (normalized), else the whole answer."""
  options = {normalize(c) for c in choices}
  return next((w for w in words(answer) if w in options), normalize(answer))


def is_correct(answer: str, truth: str, choices: Sequence[str] | None = None) -> bool:
  if choices:
    return decision(answer, choices) == normalize(truth)
  return exact_match(answer, truth)


def accuracy_by_type(records: Iterable[Mapping], answer_key: str = "prediction",
                     truth_key: str = "answer", type_key: str = "qtype") -> dict[str, float]:
  """Fraction of correct answers per question type (types in first-seen order); records with
  `choices` are scored by their decision word, the others by exact match."""
  hits: dict[str, list[bool]] = collections.defaultdict(list)
  for r in records:
    hits[r[type_key]].append(is_correct(r[answer_key], r[truth_key], r.get("choices")))
  return {t: sum(h) / len(h) for t, h in hits.items()}


def mean(values: Sequence[float]) -> float:
  return sum(values) / len(values) if values else float("nan")
