"""LLaVA-1.5's two training stages (Liu et al., "Improved Baselines with Visual Instruction Tuning").

    llava-jax train --config configs/llava_v1_5.py:stage=pretrain,size=7b --workdir gs://.../stage1
    llava-jax train --config configs/llava_v1_5.py:stage=finetune,size=7b --workdir gs://.../stage2 \
        --config.init=gs://.../stage1

Stage 1 (pretrain, feature alignment on LCS-558K): only the projector trains, lr 1e-3, global
batch 256, template `plain`. Stage 2 (finetune, llava_v1_5_mix665k): projector + language
model train, lr 2e-5, global batch 128, template `vicuna_v1`. Both: one epoch, cosine decay after
3% linear warmup, no weight decay, max length 2048; the vision tower is frozen throughout.
`size=tiny` is the same recipe at toy scale (random init, runs on a laptop CPU).

Stage 2 with LoRA (llava-v1.5-7b-lora's scripts/v1_5/finetune_lora.sh), instead of `finetune`:

    llava-jax train --config configs/llava_v1_5.py:stage=finetune_lora,size=7b --workdir gs://.../stage2_lora \
        --config.init=gs://.../stage1

finetune_lora: the language model frozen, rank-128 adapters (alpha 256, dropout 0.05) on every linear layer of its
decoder layers, trained at lr 2e-4 together with the projector at 2e-5, over a frozen base stored bfloat16
(frozen_dtype). finetune_qlora: the same with the adapted kernels stored 4-bit NF4 (finetune_qlora.sh's bits=4), the
rest of the frozen base bfloat16. See README's LoRA section.
"""

import ml_collections

from llava_jax.train.build import STAGE_TRAINABLE

LORA = dict(rank=128, alpha=256.0, dropout=0.05, targets="language_model/layers/.*", quantize="none", group_size=64)
PROJECTOR_LR_MULTIPLIER = 0.1  # LoRA stages: the projector (and NeXT's image_newline) at 2e-5 against 2e-4
LORA_LR_MULTIPLIERS = (("projector/.*", PROJECTOR_LR_MULTIPLIER), ("image_newline", PROJECTOR_LR_MULTIPLIER),
                       (".*", 1.0))

STAGES = {  # the trainable parameters of each stage are llava_jax's STAGE_TRAINABLE
    "pretrain": dict(lr=1e-3, batch_size=256, template="plain"),
    "finetune": dict(lr=2e-5, batch_size=128, template="vicuna_v1"),
    "finetune_lora": dict(lr=2e-4, batch_size=128, template="vicuna_v1", lora=LORA,
                          lr_multipliers=LORA_LR_MULTIPLIERS, frozen_dtype="bfloat16"),
    "finetune_qlora": dict(lr=2e-4, batch_size=128, template="vicuna_v1", lora=dict(LORA, quantize="nf4"),
                           lr_multipliers=LORA_LR_MULTIPLIERS, frozen_dtype="bfloat16"),
}

SIZES = {  # model name in configs/models.py, compute dtype, remat policy, mesh, accumulation
    "7b": dict(model="7b", dtype="bfloat16", remat_policy="dots_no_batch", fsdp=-1, grad_accum_steps=1,
               log_every=10, checkpoint_every=1000),
    "13b": dict(model="13b", dtype="bfloat16", remat_policy="dots_no_batch", fsdp=-1, grad_accum_steps=1,
                log_every=10, checkpoint_every=1000),
    "tiny": dict(model="tiny", dtype="float32", remat_policy="none", fsdp=1, grad_accum_steps=1,
                 log_every=1, checkpoint_every=50, lora_group_size=16),  # 64 divides none of its widths
}


def parse_args(arg: str, stages: dict, sizes: dict) -> dict:
  """`stage=...,size=...` -> {"stage", "size"} (defaults: pretrain, 7b), each checked against its table."""
  out = {"stage": "pretrain", "size": "7b"}
  usage = f"stage={'|'.join(stages)},size={'|'.join(sizes)}"
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in out:
      raise ValueError(f"config argument {part!r}: expected {usage}")
    out[key] = value
  for key, table in (("stage", stages), ("size", sizes)):
    if out[key] not in table:
      raise ValueError(f"config argument {key}={out[key]!r}: expected one of {sorted(table)}")
  return out


def recipe(stage_name: str, size_name: str, stage: dict, size: dict) -> ml_collections.ConfigDict:
  """The training config of one stage and size; `stage` may set trainable, lr_multipliers, max_len, max_images,
  max_tiles, num_frames, lora and image_aspect_ratio beyond LLaVA-1.5's lr, batch_size and template."""
  c = ml_collections.ConfigDict()
  c.stage = stage_name
  c.size = size_name
  c.init = ""                       # HF folder / llava-jax checkpoint / training workdir; "" = random init
  c.model = size["model"]           # architecture for random init (configs/models.py)
  c.tokenizer = ""                  # folder with tokenizer/processor files for random init
  # (regex over "/"-joined param paths, trains?) and (regex, learning-rate multiplier); first match wins.
  c.trainable = tuple(stage.get("trainable", STAGE_TRAINABLE[stage_name]))
  c.lr_multipliers = tuple(stage.get("lr_multipliers", ((".*", 1.0),)))
  # LoRA adapters (models/lora.py); targets "" = none. targets: regex over linear layers' parameter paths
  # (without the leaf name); quantize: none | int8 | nf4, the frozen targeted kernels (QLoRA), in groups of
  # group_size inputs.
  c.lora = ml_collections.ConfigDict(dict(stage.get("lora", dict(LORA, targets="")),
                                          group_size=size.get("lora_group_size", LORA["group_size"])))

  c.data = ml_collections.ConfigDict()
  c.data.json = ""
  c.data.image_folder = ""
  c.data.video_folder = ""          # video samples (LLaVA-Video's `video` field; video models only)
  c.data.num_frames = stage.get("num_frames", 0)  # frames sampled per video; 0 = the model folder's
  c.data.template = stage["template"]
  c.data.max_len = stage.get("max_len", 2048)
  c.data.max_images = stage.get("max_images", 1)
  # Tower inputs per row; 0 = max_images x the image layout's most per image (packed: at least max_len // image
  # tokens per tile).
  c.data.max_tiles = stage.get("max_tiles", 0)
  c.data.packing = False            # several samples per row (segment ids), first fit in data order
  c.data.buckets = ()               # padded lengths; () = a quarter, half and all of max_len
  c.data.source = "json"            # json | tfds
  c.data.tfds_dir = ""
  c.data.num_workers = 0            # grain worker processes
  c.data.shuffle = True             # seeded; a new order every epoch
  c.data.image_aspect_ratio = stage.get("image_aspect_ratio", "pad")  # LLaVA-1.5 pads images to square

  c.batch_size = stage["batch_size"]  # global, over all devices and hosts
  c.grad_accum_steps = size["grad_accum_steps"]
  c.total_steps = 0                 # 0 = one epoch
  c.lr = stage["lr"]
  c.warmup_ratio = 0.03
  c.weight_decay = 0.0
  c.max_grad_norm = 1.0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8

  c.checkpoint_every = size["checkpoint_every"]  # steps between checkpoints; 0 = only the final one
  c.keep_checkpoints = 3            # newest checkpoints kept in WORKDIR/checkpoints
  c.log_every = size["log_every"]   # steps between metrics.jsonl lines (each one syncs the host)
  c.progress_bar = True
  c.seed = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = size["fsdp"]
  c.mesh.tensor = 1
  if size["fsdp"] != -1:
    c.mesh.data = -1                # tiny: plain data parallelism over whatever devices exist
  c.dtype = size["dtype"]           # compute dtype; parameters are float32, but see frozen_dtype
  # float32 | bfloat16: how the parameters `trainable` freezes are stored (the LoRA stages: a bf16 base, as
  # LLaVA's LoRA scripts load it); trained parameters, their gradients and optimizer state stay float32.
  c.frozen_dtype = stage.get("frozen_dtype", "float32")
  c.remat_policy = size["remat_policy"]  # none | full | dots | dots_no_batch
  c.attention = "auto"              # auto | xla | cudnn | splash (models/attention.select_kernel)
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_args(arg, STAGES, SIZES)
  return recipe(args["stage"], args["size"], STAGES[args["stage"]], SIZES[args["size"]])
