"""Stage 0: the "pretrained" parts LLaVA assumes, made from nothing on the ShapesWorld corpus.

- `train_clip`: our `ClipVisionTower` trained contrastively (CLIP's symmetric InfoNCE with a
  learned temperature) against a small causal text tower pooled at its end-of-text token, as
  CLIP's is. Each image also gets one hard-negative caption (one attribute of one object
  changed, NegCLIP-style), so the features must bind colors to shapes rather than list them.
  With `RegionTargets`, a dense term (as in region-text pretraining, e.g. RegionCLIP) also
  matches each object's patch token against the text embeddings of every "size color shape"
  phrase: the image tokens LLaVA reads then each say which object they hold (a per-token probe
  found the object in 93% of held-out patches, against 75% with the global loss alone).
- `train_lm`: our `LlamaModel` trained as a causal LM on packed text of the corpus.

Only the vision tower and the language model survive; the text tower and the contrastive
heads are thrown away, as LLaVA throws away CLIP's text half.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llava_jax.config import TextConfig, VisionConfig
from llava_jax.models.clip import ClipVisionTower
from llava_jax.models.attention import AttentionMask
from llava_jax.models.llama import LlamaModel

Progress = Callable[[int, float], None]  # (step, loss) after each step


def init_key(seed: int) -> jax.Array:
  """A parameter-init key whose random bits XLA compiles in a third of threefry's time on CPU
  (the demo's inits are compiled once and run once: their compile time is what they cost)."""
  return jax.random.key(seed, impl="unsafe_rbg")


def _optimizer(lr: float, steps: int, warmup: float = 0.1, weight_decay: float = 0.0):
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(steps * warmup)), max(2, steps), lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def _fit(step: Callable, params, opt_state, arrays: Sequence[np.ndarray], steps: int, batch_size: int,
         seed: int, progress: Progress | None):
  """Runs `steps` jitted steps over shuffled epochs of `arrays` (rows in unison); returns
  params and the loss curve. `step(params, opt_state, *batch) -> (params, opt_state, loss)`."""
  rng = np.random.default_rng(seed)
  losses, order = [], np.zeros(0, np.int64)
  for i in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(len(arrays[0]))])
    idx, order = order[:batch_size], order[batch_size:]
    params, opt_state, loss = step(params, opt_state, *(a[idx] for a in arrays))
    losses.append(float(loss))
    if progress:
      progress(i + 1, losses[-1])
  return params, losses


# ---- CLIP -------------------------------------------------------------------------------------


class TextBlock(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x, mask):
    y = nn.LayerNorm()(x)
    x = x + nn.SelfAttention(self.heads, qkv_features=self.width)(y, mask=mask)
    y = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(y * jax.nn.sigmoid(1.702 * y))  # quick_gelu, as CLIP's


class TextTower(nn.Module):
  """CLIP's text transformer: causal, pre-LayerNorm, pooled at the end-of-text token."""
  vocab_size: int
  width: int = 64
  layers: int = 2
  heads: int = 4
  max_len: int = 48
  embed_dim: int = 64

  @nn.compact
  def __call__(self, ids, eot_index):
    x = nn.Embed(self.vocab_size, self.width)(ids)
    x = x + self.param("positions", nn.initializers.normal(0.01), (self.max_len, self.width))[:ids.shape[1]]
    mask = nn.make_causal_mask(ids)
    for _ in range(self.layers):
      x = TextBlock(self.width, self.heads)(x, mask)
    x = nn.LayerNorm()(x)
    pooled = jnp.take_along_axis(x, eot_index[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.embed_dim, use_bias=False)(pooled)


class RegionTargets(NamedTuple):
  """Dense targets: per image, the patch index and phrase index of each object slot."""
  patch: np.ndarray        # (N, K) int32 index of the patch holding each object; -1 = no object
  phrase: np.ndarray       # (N, K) int32 index into the phrase set
  phrase_ids: np.ndarray   # (P, T) tokens of every phrase (pad after EOT)
  phrase_eot: np.ndarray   # (P,) index of each phrase's end-of-text token


def object_mask(patch_index, n_patches: int):
  """RegionTargets.patch (N, K), -1 for an empty slot -> (N, n_patches) 1.0 on the patches holding objects."""
  return jnp.minimum(jnp.sum(jax.nn.one_hot(patch_index, n_patches), axis=1), 1.0)  # one_hot(-1) is all zeros


POOLS = ("cls", "mean", "objects")


def pool_patches(hidden, pool: str, mask=None):
  """The image's global vector from the tower's last hidden states (N, 1 + patches, D).

  "cls" is CLIP's. "mean" over all patches spreads the caption over every patch, background
  included, and the LM then reads the image's bag of colors there instead of finding the object
  asked about (97% of its image attention was on background patches). "objects" averages only
  the patches that hold objects (`mask`, from the annotations' boxes): the LM's attention then
  went to the asked-for object (see the README).
  """
  if pool == "cls":
    return hidden[:, 0]
  patches = hidden[:, 1:]
  if pool == "objects":
    return jnp.sum(patches * mask[..., None], axis=1) / jnp.sum(mask, axis=1, keepdims=True)
  return jnp.mean(patches, axis=1)


class ClipPair(nn.Module):
  """Vision tower (params under `vision_tower/`, LLaVA's names) + text tower + contrastive heads."""
  vision: VisionConfig
  text: TextTower
  embed_dim: int
  pool: str = "mean"  # see pool_patches

  def setup(self):
    # Contrastive training reads the last layer; LLaVA later reads whichever layer its config says.
    self.vision_tower = ClipVisionTower(self.vision, (self.vision.num_hidden_layers,))
    self.post_layernorm = nn.LayerNorm(epsilon=self.vision.layer_norm_eps)
    self.visual_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.patch_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.text_tower = self.text
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

  def __call__(self, pixels, ids, eot_index, mask):
    """Unit image, patch and text embeddings, and the logit scale. `mask`: see pool_patches."""
    hidden = self.vision_tower(pixels)[0]
    img = _unit(self.visual_projection(self.post_layernorm(pool_patches(hidden, self.pool, mask))))
    patches = _unit(self.patch_projection(self.post_layernorm(hidden[:, 1:])))
    return img, patches, _unit(self.text_tower(ids, eot_index)), jnp.exp(jnp.minimum(self.logit_scale, math.log(100.0)))


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_loss(img, txt, hard_txt, scale):
  """Symmetric InfoNCE; images also rank their own hard-negative captions."""
  logits = scale * img @ txt.T
  labels = jnp.arange(img.shape[0])
  hard = scale * jnp.sum(img * hard_txt, axis=-1, keepdims=True)
  i2t = optax.softmax_cross_entropy_with_integer_labels(jnp.concatenate([logits, hard], axis=1), labels)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return (i2t.mean() + t2i.mean()) / 2, jnp.mean(jnp.argmax(logits, axis=1) == labels)


def region_loss(patches, phrases, patch_index, phrase_index, scale):
  """Mean cross-entropy of each object's patch embedding over all phrase embeddings."""
  picked = jnp.take_along_axis(patches, jnp.maximum(patch_index, 0)[..., None], axis=1)  # (B, K, D)
  ce = optax.softmax_cross_entropy_with_integer_labels(scale * picked @ phrases.T, phrase_index)
  valid = (patch_index >= 0).astype(ce.dtype)
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def train_clip(vision: VisionConfig, pixels: np.ndarray, ids: np.ndarray, eot: np.ndarray,
               hard_ids: np.ndarray, hard_eot: np.ndarray, *, vocab_size: int, steps: int, batch_size: int,
               lr: float = 2e-3, seed: int = 0, text_width: int = 64, text_layers: int = 2, pool: str = "mean",
               regions: RegionTargets | None = None,
               progress: Progress | None = None) -> tuple[dict, list[float]]:
  """Returns the trained `vision_tower` params (LLaVA's parameter names) and the loss curve.

  pixels (N, H, W, 3) preprocessed; ids/hard_ids (N, T) caption tokens (pad after EOT);
  eot/hard_eot (N,) index of each caption's end-of-text token; `regions` adds the dense term
  (its phrases encoded at the captions' length T).
  """
  if pool not in POOLS:
    raise ValueError(f"train_clip: pool={pool!r}; expected one of {POOLS}")
  if pool == "objects" and regions is None:
    raise ValueError("train_clip: pool='objects' needs `regions` (the patches holding objects)")
  text = TextTower(vocab_size, text_width, text_layers, max(1, text_width // 16), ids.shape[1], text_width)
  model = ClipPair(vision, text, text_width, pool)
  n_patches = vision.num_patches
  params = nn.unbox(jax.jit(model.init)(init_key(seed), pixels[:2], ids[:2], eot[:2], np.ones((2, n_patches)))["params"])
  tx = _optimizer(lr, steps, weight_decay=1e-4)
  opt_state = jax.jit(tx.init)(params)  # one compile, not one per parameter's zeros
  arrays = (pixels, ids, eot, hard_ids, hard_eot)
  if regions is not None:
    arrays += (regions.patch, regions.phrase)

  def loss_fn(p, px, t, e, ht, he, *region_batch):
    # Captions, hard negatives and phrases go through the text tower as one batch: one copy of
    # it in the step's program instead of three, less for XLA to compile.
    texts, ends = [t, ht], [e, he]
    if regions is not None:
      texts, ends = texts + [regions.phrase_ids], ends + [regions.phrase_eot]
    mask = object_mask(region_batch[0], n_patches) if pool == "objects" else None
    img, patches, txt, scale = model.apply({"params": p}, px, jnp.concatenate(texts), jnp.concatenate(ends), mask)
    b = t.shape[0]
    loss, _ = clip_loss(img, txt[:b], txt[b:2 * b], scale)
    if regions is not None:
      loss = loss + region_loss(patches, txt[2 * b:], *region_batch, scale)
    return loss

  @jax.jit
  def step(p, o, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  params, losses = _fit(step, params, opt_state, arrays, steps, batch_size, seed, progress)
  return jax.device_get(params["vision_tower"]), losses


# ---- language model ---------------------------------------------------------------------------


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
  """Concatenates documents (each ended by EOS) and cuts the stream into (n, seq_len) rows."""
  stream = np.concatenate([np.append(np.asarray(t, np.int32), eos_id) for t in token_lists])
  n = len(stream) // seq_len
  return stream[:n * seq_len].reshape(n, seq_len)


def train_lm(text: TextConfig, rows: np.ndarray, *, steps: int, batch_size: int, lr: float = 3e-3,
             seed: int = 0, progress: Progress | None = None) -> tuple[dict, list[float]]:
  """Next-token training of `LlamaModel` on packed rows (n, S). Returns params and the loss curve."""
  model = LlamaModel(text)
  seq = rows.shape[1]
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch_size, seq))
  causal = np.broadcast_to(np.tril(np.ones((seq, seq), bool)), (batch_size, seq, seq))

  def forward(m, ids):
    return m(m.embed(ids), positions[:ids.shape[0]], AttentionMask(causal[:ids.shape[0]]))[0]

  params = nn.unbox(jax.jit(lambda k, x: model.init(k, x, method=forward))(init_key(seed), rows[:1])["params"])
  tx = _optimizer(lr, steps, weight_decay=0.0)
  opt_state = jax.jit(tx.init)(params)  # one compile, not one per parameter's zeros

  def loss_fn(p, ids):
    logits = model.apply({"params": p}, ids, method=forward)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  @jax.jit
  def step(p, o, ids):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  params, losses = _fit(step, params, opt_state, (rows,), steps, batch_size, seed, progress)
  return jax.device_get(params), losses
