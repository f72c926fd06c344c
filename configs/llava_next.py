"""LLaVA-NeXT's (LLaVA-1.6) two training stages (Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world
knowledge", 2024), on AnyRes images: each image gives its tiles and its own number of image tokens.

    llava-jax train --config configs/llava_next.py:stage=pretrain,size=7b --workdir gs://.../stage1
    llava-jax train --config configs/llava_next.py:stage=finetune,size=7b --workdir gs://.../stage2 \
        --config.init=gs://.../stage1

Stage 1 (pretrain) is LLaVA-1.5's: the projector and the image_newline embedding train, lr 1e-3, global
batch 256, template `plain`, max length 2048. Stage 2 (finetune) trains everything, the vision tower
included at its own learning rate: 2e-6 against 2e-5 for the rest (an lr multiplier of 0.1), global batch
128, max length 4096, the template of the size's language model (`vicuna_v1` for Vicuna, `chatml_direct`
for the 34b's Yi). Both: one epoch, cosine decay after 3% warmup, no weight decay; images are preprocessed
by the model folder's (AnyRes) image processor. `size=tiny` is the recipe at toy scale (random init).
finetune_lora / finetune_qlora: stage 2 as LLaVA-1.5's LoRA stages (configs/llava_v1_5.py) with NeXT's template,
length and images: adapters on the frozen language model, the projector and image_newline at 2e-5, the vision tower
frozen.
"""

import importlib.util
import os

# The recipe's shared code is LLaVA-1.5's config module, beside this file.
_spec = importlib.util.spec_from_file_location("llava_jax_configs_llava_v1_5",
                                               os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                            "llava_v1_5.py"))
v1_5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v1_5)

TOWER_LR_MULTIPLIER = 0.1  # 2e-6 for the vision tower / 2e-5 for the rest

SIZES = {  # LLaVA-1.5's runtime settings per scale, the NeXT model (configs/models.py) and its template
    "7b": dict(v1_5.SIZES["7b"], model="llava-v1.6-vicuna-7b", template="vicuna_v1"),
    "13b": dict(v1_5.SIZES["13b"], model="llava-v1.6-vicuna-13b", template="vicuna_v1"),
    "34b": dict(v1_5.SIZES["13b"], model="llava-v1.6-34b", template="chatml_direct"),
    "tiny": dict(v1_5.SIZES["tiny"], model="tiny-next", template="vicuna_v1"),
}


def stages(size: dict) -> dict:
  return {
      "pretrain": dict(v1_5.STAGES["pretrain"], image_aspect_ratio=""),
      "finetune": dict(v1_5.STAGES["finetune"], template=size["template"], max_len=4096, image_aspect_ratio="",
                       trainable=((".*", True),),
                       lr_multipliers=(("vision_tower/.*", TOWER_LR_MULTIPLIER), (".*", 1.0))),
      **{name: dict(v1_5.STAGES[name], template=size["template"], max_len=4096, image_aspect_ratio="")
         for name in ("finetune_lora", "finetune_qlora")},
  }


def get_config(arg: str = ""):
  args = v1_5.parse_args(arg, v1_5.STAGES, SIZES)
  size = SIZES[args["size"]]
  return v1_5.recipe(args["stage"], args["size"], stages(size)[args["stage"]], size)
