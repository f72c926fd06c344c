"""The one rule between a prompt row's image tokens and its images' features, shared by the data
side (processor, training pipeline, generation engine) and the model's own host-side check."""

from __future__ import annotations

import numpy as np

from llava_jax.errors import LlavaJaxError


def check_image_tokens(input_ids, image_token_id: int, num_features: int, where: str, images: str = "images") -> None:
  """The one rule between a row's tokens and its images: each image token takes one of the features its images
  give (by the row's feature index, or in order), so there are exactly as many image tokens as features."""
  found = int(np.sum(np.asarray(input_ids) == image_token_id))
  if found != num_features:
    raise LlavaJaxError(f"{where}: {found} image tokens but its {images} give {num_features} image features")
