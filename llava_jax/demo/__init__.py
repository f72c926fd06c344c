"""`llava-jax demo`: a miniature LLaVA trained from nothing on ShapesWorld (see recipe.py)."""


def demo_command(workdir: str = "demo_workdir", quick: bool = False) -> dict:
  from llava_jax.demo.recipe import run_demo  # pylint: disable=import-outside-toplevel  (imports jax)
  return run_demo(workdir, quick)


__all__ = ["demo_command"]
