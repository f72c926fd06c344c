"""The `llava_jax` model of lmms-eval (`pip install -e .[eval]` registers it through the `lmms_eval.models`
entry point): lmms-eval's tasks answered by the JAX engine.

    lmms-eval --model llava_jax --model_args pretrained=MODEL[,batch_size=8] --tasks pope --output_path OUT

generate_until: each request is one user turn of the model's conversation template with the doc's images (as
`llava-jax eval` asks), decoded greedily (a task's temperature > 0 samples) up to its max_new_tokens and cut at
its `until` strings; requests are answered in batches of batch_size, each one compiled engine program.
loglikelihood: from one prefill of the context's prompt followed by the continuation, the continuation's mean
negative log-likelihood per token, as lmms-eval's own LLaVA models return it (llava_hf.py: the model's loss)
and its multiple_choice scoring expects (it picks the argmin), and whether every continuation token is the
greedy one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from lmms_eval.api.model import lmms

MODEL_ID = "llava_jax"


def manifest():
  """The entry point's payload (setup.py: lmms_eval.models)."""
  from lmms_eval.models.registry_v2 import ModelManifest
  return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaJax")


def _pair(loss: float, greedy: bool):
  """(loss, is_greedy) in the form lmms-eval 0.7.3's evaluator keeps: it str()s every model output but a
  GenerationResult, whose `text` it passes on as is (api/instance.py unwrap_generation_output)."""
  from lmms_eval.api.instance import GenerationResult
  return GenerationResult(text=(loss, greedy))


class LlavaJax(lmms):
  is_simple = True

  def __init__(self, pretrained: str, batch_size: int | str = 8, **kwargs):
    super().__init__()
    from llava_jax.infer.run import load_session
    self.session = load_session(pretrained)
    self.batch_size = int(batch_size)

  # ---- requests -> engine prompts

  def _images(self, doc_to_visual, doc_id, task, split) -> list:
    from llava_jax.data import images as images_lib
    visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
    flat = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
      flat += list(v) if isinstance(v, (list, tuple)) else [v]
    return [images_lib.to_rgb(v, name=f"{task} doc {doc_id}") for v in flat if v is not None]

  def _prompt(self, context: str, images: list, continuation_ids: Sequence[int] = ()):
    from llava_jax.infer.generate import Prompt
    prompt = Prompt.of(self.session.processor.prepare(context, images))
    if len(continuation_ids):
      prompt = Prompt(np.concatenate([prompt.input_ids, np.asarray(continuation_ids, prompt.input_ids.dtype)]),
                      prompt.pixel_values, prompt.image_feature_index)
    return prompt

  def _batches(self, items: list) -> list[list]:
    return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

  # ---- lmms-eval's API

  def generate_until(self, requests) -> list[str]:
    from llava_jax.infer.sampling import SamplingParams
    answers: list[str] = []
    # Requests of one task share their gen_kwargs: consecutive runs of equal ones are batched together.
    groups: list[list] = []
    for request in requests:
      if groups and groups[-1][0].args[1] == request.args[1]:
        groups[-1].append(request)
      else:
        groups.append([request])
    for group in groups:
      kwargs = dict(group[0].args[1])
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      temperature = float(kwargs.get("temperature", 0) or 0) if kwargs.get("do_sample", True) else 0.0
      params = SamplingParams(temperature=temperature, top_p=float(kwargs.get("top_p") or 1.0))
      for batch in self._batches(group):
        prompts = [self._prompt(context, self._images(visual, doc_id, task, split))
                   for context, _, visual, doc_id, task, split in (r.args for r in batch)]
        prompts += [prompts[-1]] * (self.batch_size - len(prompts))  # one batch shape, one compiled program
        completions = self.session.engine.generate(prompts, int(kwargs.get("max_new_tokens", 128)), params)
        for request, completion in zip(batch, completions):
          text = self.session.processor.decode(completion.tokens)
          for stop in until:
            text = text.split(stop)[0] if stop else text
          answers.append(text.strip())
          self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answers[-1])
    return answers

  def loglikelihood(self, requests) -> list:
    tokenizer = self.session.processor.tokenizer
    out = []
    for batch in self._batches(list(requests)):
      prompts, lengths = [], []
      for context, target, visual, doc_id, task, split in (r.args for r in batch):
        doc = self.task_dict[task][split][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prompts.append(self._prompt(context, self._images(visual, doc_id, task, split), ids))
        lengths.append(len(ids))
      logits, _ = self.session.engine.forward(prompts)  # left-padded: every row ends with its continuation
      for row, prompt, n in zip(logits, prompts, lengths):
        predicting = row[-n - 1:-1].astype(np.float64)  # the logits of the positions before each token
        log_probs = predicting - np.logaddexp.reduce(predicting, axis=-1, keepdims=True)
        targets = prompt.input_ids[-n:]
        loss = -float(log_probs[np.arange(n), targets].mean())
        out.append(_pair(loss, bool((predicting.argmax(-1) == targets).all())))
    return out

  def generate_until_multi_round(self, requests) -> list[str]:
    raise NotImplementedError("llava_jax: multi-round generation is not supported")
