"""Pure Flax modules: no I/O, no imports from the rest of llava_jax except config and errors."""
