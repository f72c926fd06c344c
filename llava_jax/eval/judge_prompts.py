"""The official judges' prompts, as data: the text must match the source for the scores to be comparable.

LLaVA-Bench (in-the-wild): LLaVA's llava/eval/eval_gpt_review_bench.py (system message, the review's layout,
temperature 0.2, GPT-4 `gpt-4-0314`) with the rules "llava_bench_conv", "llava_bench_detail" and
"llava_bench_complex" of llava/eval/table/rule.json (haotian-liu/LLaVA, commit 181a2f8; the three texts are
the same, role "Assistant").

MM-Vet: yuweihao/MM-Vet mm-vet_evaluator.py (the few-shot grading table, one user message, max_tokens 3,
temperature 0.0 then retries with MM_VET_RETRY_SUFFIX at rising temperature; GPT-4 `gpt-4-0613`).
"""

LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

LLAVA_BENCH_ROLE = "Assistant"

LLAVA_BENCH_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment.")

# The categories of LLaVA-Bench (in-the-wild): rule.json's "llava_bench_" + category.
LLAVA_BENCH_CATEGORIES = ("conv", "detail", "complex")


def llava_bench_review(context: str, question: str, reference: str, answer: str) -> str:
  """eval_gpt_review_bench.py's user message: the reference answer is Assistant 1, the judged answer Assistant 2."""
  role = LLAVA_BENCH_ROLE
  return (f"[Context]\n{context}\n\n"
          f"[Question]\n{question}\n\n"
          f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
          f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
          f"[System]\n{LLAVA_BENCH_RULE}\n\n")


MM_VET_PROMPT = """\
Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in \
the ground truth means it is totally right only when all elements in the ground truth are present in the \
prediction, and <OR> means it is totally right when any one element in the ground truth is present in the \
prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 \
(totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and \
Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland \
is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these \
countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's \
pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and \
Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland \
is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these \
countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading \
nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is \
mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these \
contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast \
between the names of the countries and their actual physical characteristics. | 1.0
"""

MM_VET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "

# MM-Vet's capabilities, as mm-vet.json names them.
MM_VET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")


def mm_vet_grading(question: str, ground_truth: str, prediction: str, retry: bool) -> str:
  """mm-vet_evaluator.py's user message: the table's last row, its correctness left blank."""
  row = " | ".join([question, ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), prediction, ""])
  return MM_VET_PROMPT + "\n" + row + (MM_VET_RETRY_SUFFIX if retry else "")
