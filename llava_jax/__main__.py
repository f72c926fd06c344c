"""`python -m llava_jax SUBCOMMAND` is the same as `llava-jax SUBCOMMAND`."""

from llava_jax.cli import main

if __name__ == "__main__":
  main()
