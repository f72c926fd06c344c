"""The miniature LLaVA recipe on ShapesWorld (`llava-jax demo`), as ordinary training configs.

    llava-jax train --config configs/demo_shapes.py:stage=pretrain --workdir W1 \
        --config.init=STAGE0_MODEL --config.data.json=train_caption.json --config.data.image_folder=DATA
    llava-jax train --config configs/demo_shapes.py:stage=finetune --workdir W2 \
        --config.init=W1 --config.data.json=train_instruct.json --config.data.image_folder=DATA

It is LLaVA-1.5's recipe (configs/llava_v1_5.py: `plain` projector-only pretraining, then
`vicuna_v1` finetuning of projector + language model with the vision tower frozen) with the
numbers a 2-core CPU can afford in minutes: models of ~1M parameters learn with far larger
learning rates and far fewer, smaller steps. `quick=1` is the `demo --quick` budget.
The architecture comes from the stage-0 model folder given as `init`.
"""

import importlib.util
import os

# (steps, batch, lr) per stage, chosen by measurement (benchmarks/demo.md). Stage 1 needs
# enough steps to align on its own; otherwise stage 2 spends its budget on alignment.
SCHEDULE = {
    ("pretrain", False): dict(total_steps=300, batch_size=32, lr=3e-3),
    ("finetune", False): dict(total_steps=850, batch_size=32, lr=2e-3),
    ("pretrain", True): dict(total_steps=20, batch_size=32, lr=3e-3),
    # Many small steps ground sooner; fewer leave the quick run's grounding to the seed's luck.
    ("finetune", True): dict(total_steps=1600, batch_size=4, lr=2e-3),
}
MAX_LEN = 160  # default token budget; `llava-jax demo` passes its own (recipe.Settings.max_len)


def _base():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava_v1_5.py")
  spec = importlib.util.spec_from_file_location("llava_jax_configs_llava_v1_5", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _parse(arg: str) -> dict:
  out = {"stage": "pretrain", "quick": "0", "max_len": str(MAX_LEN)}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in out:
      raise ValueError(f"config argument {part!r}: expected stage=pretrain|finetune,quick=0|1,max_len=N")
    out[key] = value
  return out


def get_config(arg: str = ""):
  args = _parse(arg)
  stage, quick = args["stage"], args["quick"] in ("1", "true", "True")
  if (stage, quick) not in SCHEDULE:
    raise ValueError(f"config argument stage={stage!r}: expected pretrain or finetune")
  c = _base().get_config(f"stage={stage},size=tiny")
  for key, value in SCHEDULE[(stage, quick)].items():
    c[key] = value
  c.warmup_ratio = 0.1
  c.weight_decay = 0.0
  c.data.max_len = int(args["max_len"])
  c.data.buckets = (int(args["max_len"]),)  # one compiled shape: every batch holds a long sample anyway
  c.data.read_threads = 2
  c.log_every = 5
  c.checkpoint_every = 0  # only the final checkpoint: saving is slow next to these steps
  c.keep_checkpoints = 1
  return c
