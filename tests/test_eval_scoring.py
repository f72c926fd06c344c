"""Scoring of free-form answers: exact match per type and the POPE paper's metrics."""

import math

import pytest

from llava_jax.eval import pope, scoring


@pytest.mark.parametrize("answer,truth,hit", [
    ("red", "red", True), ("Red.", "red", True), ("red, I think", "red", True), ("the red one", "red", True),
    ("blue", "red", False), ("two", "2", True), ("2", "2", True), ("3 objects", "2", False),
    ("", "red", False), ("yes", "no", False), ("Left.", "left", True), ("red star", "red star", True),
    ("red circle", "red star", False),
])
def test_exact_match(answer, truth, hit):
  assert scoring.exact_match(answer, truth) is hit


COLORS = ("red", "blue", "green")


@pytest.mark.parametrize("answer,truth,hit", [
    ("The star is red.", "red", True), ("The large star is blue.", "red", False), ("Red.", "red", True),
    ("red, not blue", "red", True), ("A red star? No, there is none.", "red", True),
    ("The star.", "red", False), ("", "red", False),
])
def test_decision_word_scoring(answer, truth, hit):
  assert scoring.is_correct(answer, truth, COLORS) is hit


def test_decision_word_of_a_restated_yes_no():
  assert scoring.decision("A red star? No, there is none.", ("yes", "no")) == "no"
  assert scoring.decision("A red star? Yes, there is one.", ("yes", "no")) == "yes"
  assert scoring.decision("I cannot tell", ("yes", "no")) == "i cannot tell"


def test_accuracy_by_type():
  records = [{"qtype": "color", "answer": "red", "prediction": "red"},
             {"qtype": "color", "answer": "red", "prediction": "blue"},
             {"qtype": "count", "answer": "3", "prediction": "three"}]
  assert scoring.accuracy_by_type(records) == {"color": 0.5, "count": 1.0}
  records[1]["prediction"] = "The star is red."  # exact match fails; its decision word is right
  assert scoring.accuracy_by_type(records) == {"color": 0.5, "count": 1.0}
  records[1]["choices"] = COLORS
  assert scoring.accuracy_by_type(records) == {"color": 1.0, "count": 1.0}


@pytest.mark.parametrize("answer,parsed", [
    ("yes", "yes"), ("Yes, there is.", "yes"), ("no", "no"), ("No.", "no"), ("There is not.", "no"),
    ("I see a red star", "yes"),  # POPE: anything without "no"/"not" counts as yes
])
def test_parse_yes_no(answer, parsed):
  assert pope.parse_yes_no(answer) == parsed


def test_pope_metrics_by_hand():
  labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
  answers = ["yes", "yes", "no", "yes", "no", "no", "No.", "Yes"]
  # tp=3 (0,1,7), fn=1 (2), fp=1 (3), tn=3 (4,5,6)
  m = pope.metrics(answers, labels)
  assert m["accuracy"] == pytest.approx(6 / 8)
  assert m["precision"] == pytest.approx(3 / 4)
  assert m["recall"] == pytest.approx(3 / 4)
  assert m["f1"] == pytest.approx(0.75)
  assert m["yes_ratio"] == pytest.approx(4 / 8)
  assert set(m) == set(pope.METRICS)


def test_pope_metrics_degenerate():
  always_no = pope.metrics(["no"] * 4, ["yes", "no", "yes", "no"])
  assert always_no["precision"] == 0.0 and always_no["recall"] == 0.0 and always_no["f1"] == 0.0
  assert always_no["yes_ratio"] == 0.0 and always_no["accuracy"] == 0.5
  always_yes = pope.metrics(["yes"] * 4, ["yes", "no", "yes", "no"])
  assert always_yes["recall"] == 1.0 and always_yes["f1"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError):
    pope.metrics(["yes"], [])


def test_mean():
  assert scoring.mean([0.5, 1.0]) == 0.75
  assert math.isnan(scoring.mean([]))
