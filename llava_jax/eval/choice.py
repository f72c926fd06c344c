"""Multiple-choice scorers: the option letter of a reply, accuracy, and MMBench's circular evaluation.

`option_letter` follows LLaVA's eval_science_qa.py: the reply is the letter ("B"), or starts with
the letter and ". " ("B. The cat"), or says "The answer is B" exactly once; also accepted (the forms the
brief's edge cases name and LLaVA's regex misses): "B." and "The answer is (B).".
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Mapping, Sequence

LETTERS = string.ascii_uppercase
_STATED = re.compile(r"The answer is \(?([A-Z])\b")


def option_letter(reply: str, num_options: int) -> str | None:
  """The letter among the first `num_options` that `reply` picks, or None."""
  options = LETTERS[:num_options]
  text = str(reply).strip()
  if text in options:
    letter = text
  elif len(text) >= 2 and text[0] in options and (text[1] == "." and (len(text) == 2 or text[2] == " ")):
    letter = text[0]
  else:
    stated = _STATED.findall(text)
    letter = stated[0] if len(stated) == 1 else None
  return letter if letter and letter in options else None


def is_right(record: Mapping) -> bool:
  """A record with "prediction", "answer" (a letter) and "num_options": did the reply pick the answer?"""
  return option_letter(record["prediction"], record["num_options"]) == record["answer"]


def _summary(hits: Sequence[tuple[bool, str]], group_key: str | None) -> dict:
  """(hit, group) pairs -> {"accuracy"} and, with a group key, {"by_" + group_key: {group: accuracy}}."""
  out = {"accuracy": sum(h for h, _ in hits) / len(hits) if hits else float("nan")}
  if group_key:
    groups: dict[str, list[bool]] = collections.defaultdict(list)
    for hit, group in hits:
      groups[group].append(hit)
    out[f"by_{group_key}"] = {g: sum(v) / len(v) for g, v in groups.items()}
  return out


def accuracy(records: Iterable[Mapping], group_key: str | None = None) -> dict:
  """The fraction of records answered right (see is_right), overall and per `group_key` value."""
  return _summary([(is_right(r), str(r.get(group_key))) for r in records], group_key)


def rotations(options: Sequence[str], answer: str) -> list[tuple[list[str], str]]:
  """MMBench's circular evaluation: the options shifted by 0..n-1 places, each with the letter the
  right option then has (LLaVA's model_vqa_mmbench.py --all-rounds order: round r shows option r first)."""
  right = LETTERS.index(answer)
  n = len(options)
  return [(list(options[r:]) + list(options[:r]), LETTERS[(right - r) % n]) for r in range(n)]


def circular_accuracy(records: Iterable[Mapping], group_key: str | None = None) -> dict:
  """Records of the rotations ("index" names the question) -> the fraction of questions with every
  rotation answered right (a rotation not answered counts as wrong), overall and per group."""
  hits: dict[str, list[bool]] = collections.defaultdict(list)
  first: dict[str, Mapping] = {}
  for r in records:
    hits[str(r["index"])].append(is_right(r))
    first.setdefault(str(r["index"]), r)
  complete = [(len(h) == first[i]["num_options"] and all(h), str(first[i].get(group_key))) for i, h in hits.items()]
  return _summary(complete, group_key)
