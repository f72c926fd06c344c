"""llava-jax: LLaVA (visual instruction tuning) in JAX/Flax."""

from llava_jax.errors import LlavaJaxError

__all__ = ["LlavaJaxError"]
__version__ = "0.1.0"
