"""benchmarks/gpu.py's transformers parts (eager/sdpa and torch.compile generation, the training step)
and the parity check, where transformers (float32, on the CPU) is the reference for our engine.

Each part is `run(size, save) -> dict`, as in gpu_jax.py. Only long-standing torch/transformers APIs
are used: the device machine has other versions than this project pins.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from gpu_common import Size, best_of, generation_entry, hf_dict, llava_config, pixels, prompt_ids, timed, train_batch, \
    train_flops


def _torch():
  import torch
  return torch


def device() -> str:
  return "cuda" if _torch().cuda.is_available() else "cpu"


def _sync():
  if device() == "cuda":
    _torch().cuda.synchronize()


def _peak_and_reset() -> int | None:
  torch = _torch()
  if device() != "cuda":
    return None
  peak = torch.cuda.max_memory_allocated()
  torch.cuda.reset_peak_memory_stats()
  return peak


def build_model(d: dict, dtype, seed: int = 0, on=None):
  """transformers' LLaVA of config dict `d`, randomly initialized directly in `dtype` on the device."""
  torch = _torch()
  import transformers
  torch.manual_seed(seed)
  default = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(on or device()):
      model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**d))
  finally:
    torch.set_default_dtype(default)
  return model


def _hf_inputs(config, batch: int, text_tokens: int, dtype):
  torch = _torch()
  ids = torch.from_numpy(prompt_ids(config, batch, text_tokens).astype(np.int64)).to(device())
  px = torch.from_numpy(pixels(config, batch)[:, 0].transpose(0, 3, 1, 2).copy()).to(device(), dtype)
  return ids, px, torch.ones_like(ids)


def _generation(size: Size, save, compiled: bool) -> dict:
  torch = _torch()
  config = llava_config(size)
  dtype = getattr(torch, size.dtype)
  start = time.perf_counter()
  model = build_model(hf_dict(size), dtype).eval()
  gc = model.generation_config
  gc.eos_token_id = None  # EOS disabled: every row makes exactly the asked number of tokens
  gc.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
  gc.do_sample = False
  kwargs = {}
  if compiled:
    from transformers import CompileConfig
    # transformers' own recipe: a static cache and a compiled decode step (CUDA graphs on a GPU).
    mode = "reduce-overhead" if device() == "cuda" else "default"
    compile_config = CompileConfig(fullgraph=False, mode=mode, backend=size.torch_compile_backend)
    compile_config._compile_all_devices = True  # let it compile on a CPU too
    kwargs = dict(cache_implementation="static", compile_config=compile_config)
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static program per batch, like ours
  out = {"attn": getattr(model.config, "_attn_implementation", None), "dtype": size.dtype, "device": device(),
         "compiled": compiled, "build_s": time.perf_counter() - start, "batches": {}}
  n = size.new_tokens
  for batch in size.batches:
    ids, px, mask = _hf_inputs(config, batch, size.text_tokens, dtype)

    def generate(tokens):
      with torch.inference_mode():
        model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                       **kwargs)
      _sync()

    _peak_and_reset()
    warm = timed(lambda: (generate(1), generate(1 + n)))
    _, ttft = best_of(lambda: generate(1), size.repeats[batch])
    _, full = best_of(lambda: generate(1 + n), size.repeats[batch])
    out["batches"][str(batch)] = dict(generation_entry(batch, n, ttft, full, warm), peak_mem_bytes=_peak_and_reset())
    save(out)
  return out


def gen_hf(size: Size, save) -> dict:
  """transformers eager (sdpa) `generate` at every batch."""
  return _generation(size, save, compiled=False)


def gen_hf_compile(size: Size, save) -> dict:
  """transformers `generate` with a static cache and its torch.compile'd decode step, at every batch."""
  return _generation(size, save, compiled=True)


def train_hf(size: Size, save) -> dict:
  """One optimizer step per case: gradient checkpointing (non-reentrant), bf16 autocast, fused AdamW,
  clipping; stage 1 with bf16 weights and a float32 projector, stage 2 with float32 weights."""
  torch = _torch()
  from configs import llava_v1_5
  out = {}
  for case in size.train:
    cfg = llava_v1_5.get_config(f"stage={case.stage},size={size.recipe_size}")
    pretrain = case.stage == "pretrain"
    model = build_model(hf_dict(size, case.layers), torch.bfloat16 if pretrain else torch.float32)
    for name, module in model.named_modules():
      if name.endswith("multi_modal_projector"):
        module.float()
    for name, p in model.named_parameters():
      p.requires_grad = "multi_modal_projector" in name if pretrain else "vision_tower" not in name
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = [p for p in model.parameters() if p.requires_grad]
    try:
      opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(cfg.adam_b1, cfg.adam_b2), eps=cfg.adam_eps,
                              weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/version
      opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(cfg.adam_b1, cfg.adam_b2), eps=cfg.adam_eps,
                              weight_decay=cfg.weight_decay)
    config = llava_config(size, case.layers)
    batch = train_batch(config, case)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device())
    labels = ids.masked_fill(torch.from_numpy(batch["loss_mask"] == 0).to(device()), -100)
    px = torch.from_numpy(batch["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy()).to(device())
    mask = torch.ones_like(ids)
    losses = []

    def step():
      with torch.autocast(device_type=device(), dtype=torch.bfloat16):
        loss = model(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
      opt.step()
      opt.zero_grad(set_to_none=True)
      losses.append(float(loss))  # waits for the step
      _sync()

    _peak_and_reset()
    first = timed(step)
    best, times = best_of(step, size.train_steps)
    flops = train_flops(config, case)
    out[case.name] = {"step_s": best, "steps_s": times, "first_step_s": first, "samples_per_s": case.batch / best,
                      "model_flops_per_step": flops, "model_tflops_per_s": flops / best / 1e12, "loss": losses[-1],
                      "optimizer": "fused AdamW" if opt.defaults.get("fused") else "AdamW",
                      "peak_mem_bytes": _peak_and_reset()}
    del model, opt, trained
    if device() == "cuda":
      torch.cuda.empty_cache()
    save(out)
  return out


# ---- parity ------------------------------------------------------------------------------------

PARITY_MODEL = "tiny"
PARITY_TOKENS = 20


def parity(size: Size, save) -> dict:
  """The `tiny` model in float32: our engine (on JAX's device, every inference layout) against transformers
  on the CPU with the same weights: max |logit difference| / max |logit| at JAX's default matmul precision
  and at "highest", and greedy tokens (EOS disabled)."""
  torch = _torch()
  import jax
  from safetensors.numpy import load_file
  from configs import models
  from llava_jax.config import LlavaConfig
  from llava_jax.infer import backend
  from llava_jax.infer.generate import Engine, Prompt
  from llava_jax.weights import mapping
  d = models.hf_dict(PARITY_MODEL)
  hf = build_model(d, torch.float32, on="cpu").eval()
  hf.generation_config.eos_token_id = None
  config = LlavaConfig.from_hf_dict(d)
  with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(folder)
    params = mapping.hf_to_params(load_file(os.path.join(folder, "model.safetensors")).__getitem__, config)
  ids, px = prompt_ids(config, 2, 11, seed=3), pixels(config, 2, seed=3)
  prompts = [Prompt(ids[i], px[i]) for i in range(2)]
  torch_ids = torch.from_numpy(ids.astype(np.int64))
  torch_px = torch.from_numpy(px[:, 0].transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    reference = hf(input_ids=torch_ids, pixel_values=torch_px).logits.numpy()
    hf_tokens = hf.generate(input_ids=torch_ids, pixel_values=torch_px, attention_mask=torch.ones_like(torch_ids),
                            max_new_tokens=PARITY_TOKENS, do_sample=False, pad_token_id=0)[:, ids.shape[1]:].numpy()
  out = {"model": PARITY_MODEL, "jax_backend": jax.default_backend(), "reference": "transformers float32 on the CPU",
         "hf_tokens": hf_tokens.tolist(), "layouts": {}}
  scale = np.abs(reference).max()
  engine = Engine(config, params, eos_token_ids=(), pad_token_id=0)
  for precision in ("default", "highest"):
    with jax.default_matmul_precision(precision if precision != "default" else None):
      ours = engine.forward(prompts)[0]
    ours = ours[:, -ids.shape[1]:]  # the engine left-pads to its length bucket
    out[f"max_rel_err_{precision}"] = float(np.abs(ours - reference).max() / scale)
  for layout in backend.LAYOUTS:
    if layout != engine.layout.name:
      engine = Engine(config, params, eos_token_ids=(), pad_token_id=0, layout=layout)
    tokens = np.stack([c.tokens for c in engine.generate(prompts, PARITY_TOKENS)])
    out["layouts"][layout] = {"tokens": tokens.tolist(), "identical_to_hf": bool(np.array_equal(tokens, hf_tokens))}
    save(out)
  out["greedy_identical"] = all(v["identical_to_hf"] for v in out["layouts"].values())
  return out


PARTS = {"gen_hf": gen_hf, "gen_hf_compile": gen_hf_compile, "train_hf": train_hf, "parity": parity}
