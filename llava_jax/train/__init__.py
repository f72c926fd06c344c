"""Training: optimizer and freezing (optim), the jitted step and loop (trainer), Orbax checkpoints
(checkpoint), metrics sinks (metrics), and the `llava-jax train` entry point (main)."""
