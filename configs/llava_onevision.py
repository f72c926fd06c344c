"""LLaVA-OneVision's training curriculum (Li et al., "LLaVA-OneVision: Easy Visual Task Transfer", 2024) as named
stages over SigLIP + Qwen2 models, each from the workdir of the one before:

    llava-jax train --config configs/llava_onevision.py:stage=pretrain,size=7b --workdir gs://.../stage1
    llava-jax train --config configs/llava_onevision.py:stage=knowledge,size=7b --workdir gs://.../stage1_5 \
        --config.init=gs://.../stage1
    llava-jax train --config configs/llava_onevision.py:stage=single_image,size=7b --workdir gs://.../si \
        --config.init=gs://.../stage1_5
    llava-jax train --config configs/llava_onevision.py:stage=onevision,size=7b --workdir gs://.../ov \
        --config.init=gs://.../si

pretrain (stage 1, language-image alignment): the projector and image_newline train, lr 1e-3, global batch 512,
template `plain` (its images take the layout of the later stages; the paper's stage 1 saw the base resolution).
knowledge (the paper's stage 1.5, high-quality knowledge learning), single_image (stage 2's
single-image instruction tuning) and onevision (stage 2's mix of single-image, multi-image and video samples): the
whole model trains, the vision tower at its own learning rate, 2e-6 against 1e-5 for the rest (an lr multiplier of
0.2), global batch 256, template `chatml` (Qwen2's). All stages: one epoch, cosine decay after 3% warmup, no weight
decay, the model folder's anyres_max_9 image processing (a lone image tiled, its features downscaled past 9 tiles'
worth), at most 8192 tokens a sample (an anyres_max_9 image takes up to about 7.4k). onevision takes samples of
up to 12 images (`image: [a, b, c]`, one `<image>` each, one tile and a newline per image) and videos (LLaVA-Video's
JSON: `video: path` relative to --config.data.video_folder, a video file or a folder of frames), each sampled
uniformly to 32 frames as OneVision trained (the paper's and lmms-eval's frame count; data.num_frames), every frame one
tile pooled to 196 tokens: 6273 tokens a video. finetune_lora / finetune_qlora: LLaVA-1.5's LoRA stages
(configs/llava_v1_5.py) with this recipe's template, length and images. `size=tiny` is the recipe at toy scale
(random init of configs/models.py's tiny-ov).
"""

import importlib.util
import os

# The recipe's shared code is LLaVA-1.5's config module, beside this file.
_spec = importlib.util.spec_from_file_location("llava_jax_configs_llava_v1_5",
                                               os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                            "llava_v1_5.py"))
v1_5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v1_5)

TOWER_LR_MULTIPLIER = 0.2  # 2e-6 for the vision tower / 1e-5 for the rest
MAX_LEN = 8192
MAX_IMAGES = 12  # onevision: images of one sample; more are counted skips

SIZES = {  # LLaVA-1.5's runtime settings per scale, the OneVision model (configs/models.py), tower inputs per row
    # (a lone image's most: its 6x6 tiles and the whole image, or MAX_IMAGES single-tile images, or a video's frames),
    # frames per video in the onevision stage
    "0.5b": dict(v1_5.SIZES["7b"], model="llava-onevision-qwen2-0.5b-ov", max_tiles=37, num_frames=32),
    "7b": dict(v1_5.SIZES["7b"], model="llava-onevision-qwen2-7b-ov", max_tiles=37, num_frames=32),
    "72b": dict(v1_5.SIZES["13b"], model="llava-onevision-qwen2-72b-ov", max_tiles=37, num_frames=32),
    "tiny": dict(v1_5.SIZES["tiny"], model="tiny-ov", max_tiles=MAX_IMAGES, num_frames=8),  # 3x3 tiles + 1, 8 <= 12
}


def stages(size: dict) -> dict:
  images = dict(template="chatml", max_len=MAX_LEN, image_aspect_ratio="", max_tiles=size["max_tiles"])
  full_model = dict(images, lr=1e-5, batch_size=256, trainable=((".*", True),),
                    lr_multipliers=(("vision_tower/.*", TOWER_LR_MULTIPLIER), (".*", 1.0)))
  return {
      "pretrain": dict(images, lr=1e-3, batch_size=512, template="plain"),
      "knowledge": full_model,
      "single_image": full_model,
      "onevision": dict(full_model, max_images=MAX_IMAGES, num_frames=size["num_frames"]),
      **{name: dict(v1_5.STAGES[name], **images) for name in ("finetune_lora", "finetune_qlora")},
  }


def get_config(arg: str = ""):
  args = v1_5.parse_args(arg, stages(SIZES["tiny"]), SIZES)
  size = SIZES[args["size"]]
  return v1_5.recipe(args["stage"], args["size"], stages(size)[args["stage"]], size)
