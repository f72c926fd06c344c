"""Short-answer scorers: the VQA accuracy (VQAv2, TextVQA, VizWiz) and GQA's exact match.

`normalize` is the EvalAI answer processor that LLaVA's m4c_evaluator.py (TextVQA) and its
convert_vqav2/vizwiz_for_submission.py scripts apply, step by step: lower case; "," and "?"
dropped and "'s" split off; punctuation removed where it touches a space (else replaced by one);
periods removed unless next to a digit; number words as digits ("none" -> "0"); articles dropped;
apostrophe-less contractions restored ("dont" -> "don't").

`vqa_accuracy` is the standard VQA metric: with 10 human answers, the prediction's score is
min(#other humans that gave it / 3, 1) averaged over the 10 ways to leave one human out.
"""

from __future__ import annotations

import re
from typing import Sequence

_NUMBERS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
# The official lookahead "(?!<=\d)" is a typo for a lookbehind; kept, it still only spares periods before a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The contracted words of the official table; each is reached from any spelling with ONE of its
# apostrophes missing ("couldnt've" and "couldn'tve" -> "couldn't've"; "dont" -> "don't").
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's "
    "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've").split()
_CONTRACTIONS = {word[:i] + word[i + 1:]: word for word in _CONTRACTED for i, c in enumerate(word) if c == "'"}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # the official table's one entry in the other direction


def _punctuation(text: str) -> str:
  out = text
  for p in _PUNCTUATION:
    if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out)


def normalize(answer: str) -> str:
  """An answer as the VQA evaluation compares it (see the module docstring)."""
  text = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
  words = [_NUMBERS.get(w, w) for w in text.split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """The VQA score of one prediction against the human answers (10 in VQAv2/TextVQA/VizWiz)."""
  humans = [normalize(a) for a in human_answers]
  if not humans:
    raise ValueError("no human answers")
  pred = normalize(prediction)
  matches = humans.count(pred)
  # Leaving out human i: the others said `pred` matches - [human i said it] times.
  return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def gqa_answer(prediction: str) -> str:
  """LLaVA's convert_gqa_for_eval.py: trailing periods stripped, lower case (then GQA's exact match)."""
  return str(prediction).strip().rstrip(".").lower()


def gqa_correct(prediction: str, truth: str) -> bool:
  return gqa_answer(prediction) == str(truth).strip().lower()
