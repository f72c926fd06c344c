"""The benchmark scorers against hand-computed scores, on the official scorers' edge cases."""

import pytest

from llava_jax.eval import choice, mme, pope, vqa


@pytest.mark.parametrize("answer,normalized", [
    ("Two dogs.", "2 dogs"),  # number word, final period
    ("None", "0"), ("Ten", "10"),
    ("an apple", "apple"), ("The Eiffel Tower", "eiffel tower"),  # articles
    ("man-made", "man made"),  # punctuation inside a word becomes a space...
    ("yes !", "yes"),  # ...and is dropped where it touches one
    ("1,000", "1000"), ("3.5", "3.5"),  # digit commas dropped, decimal points kept
    ("dont", "don't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"),  # contractions restored
    ("the cat's toy", "cat 's toy"),  # "'s" split off
    ("What?", "what"), ("red,\nblue", "red blue"),
])
def test_vqa_normalization(answer, normalized):
  assert vqa.normalize(answer) == normalized


def test_vqa_accuracy_by_hand():
  two_said_dog = ["the dog", " Dog", *["cat"] * 8]
  # Left out: one of the 2 "dog" humans -> 1 other said it (1/3), one of the 8 others -> 2 did (2/3).
  assert vqa.vqa_accuracy("dog", two_said_dog) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
  three = ["2", "two", "Two.", *["3"] * 7]
  assert vqa.vqa_accuracy("2", three) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
  four = ["two", "2", "2", "2", *["3"] * 6]
  assert vqa.vqa_accuracy("Two", four) == 1.0
  assert vqa.vqa_accuracy("4", four) == 0.0


def test_gqa_normalization():
  assert vqa.gqa_correct("Yes.", "yes") and vqa.gqa_correct("Left", "left")
  assert not vqa.gqa_correct("the left", "left")  # GQA: no article stripping


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("B.", "B"), ("B. A cat", "B"), ("The answer is B.", "B"), ("The answer is (B).", "B"),
    (" C ", "C"), ("E", None),  # outside the 4 options
    ("Because", None), ("BA", None), ("The answer is B. The answer is C.", None),  # two statements: no pick
])
def test_option_letter(reply, letter):
  assert choice.option_letter(reply, 4) == letter


def test_choice_accuracy_by_group():
  records = [{"prediction": "A", "answer": "A", "num_options": 2, "category": "x"},
             {"prediction": "The answer is (B).", "answer": "B", "num_options": 4, "category": "y"},
             {"prediction": "C.", "answer": "D", "num_options": 4, "category": "y"}]
  assert choice.accuracy(records, "category") == {"accuracy": 2 / 3, "by_category": {"x": 1.0, "y": 0.5}}


def test_rotations_move_the_right_letter():
  assert choice.rotations(["x", "y", "z"], "B") == [(["x", "y", "z"], "B"), (["y", "z", "x"], "A"),
                                                    (["z", "x", "y"], "C")]


def test_circular_accuracy_by_hand():
  rounds = lambda index, replies, answer, n: [
      {"index": index, "prediction": p, "answer": choice.rotations("abcd"[:n], answer)[r][1], "num_options": n}
      for r, p in enumerate(replies)]
  records = (rounds(1, ["B", "A.", "The answer is (C)."], "B", 3)  # every rotation right
             + rounds(2, ["A", "A"], "A", 2)  # the second rotation moved the answer to B
             + rounds(3, ["D", "C", "B"], "D", 4))  # right, but the 4th rotation was never answered
  assert choice.accuracy(records)["accuracy"] == pytest.approx(7 / 8)
  assert choice.circular_accuracy(records)["accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("answer,parsed", [
    ("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("yes, there is", "yes"),
    ("Not sure", "no"),  # MME: "no" within the first 4 characters
    ("The answer is yes", "other"), ("", "other"),
])
def test_mme_answer_rule(answer, parsed):
  assert mme.parse_answer(answer) == parsed


def test_mme_scores_by_hand():
  rec = lambda category, image, prediction, answer: locals()
  records = [rec("existence", "a.jpg", "Yes", "Yes"), rec("existence", "a.jpg", "No, it is not", "No"),
             rec("existence", "b.jpg", "no", "Yes"), rec("existence", "b.jpg", "no", "No"),
             rec("color", "c.jpg", "yes", "yes"), rec("color", "c.jpg", "no", "no"),
             rec("code_reasoning", "d.png", "The answer is yes", "Yes"), rec("code_reasoning", "d.png", "no", "No")]
  m = mme.metrics(records)
  # existence: 3 of 4 right (75), one of two images both right (50); color: 100 + 100.
  assert m["subtasks"]["existence"] == {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0}
  assert m["subtasks"]["code_reasoning"] == {"accuracy": 50.0, "accuracy_plus": 0.0, "score": 50.0}
  assert m["perception"] == 125.0 + 200.0 and m["cognition"] == 50.0


def test_pope_no_there_is_not():
  assert pope.parse_yes_no("No, there is not.") == "no"
  assert pope.parse_yes_no("Yes. There is no other dog.") == "yes"  # eval_pope.py reads the first sentence only
  assert pope.metrics(["No, there is not.", "Yes, there is a dog."], ["no", "yes"])["accuracy"] == 1.0
