"""The benchmark tasks `llava-jax eval --task` accepts, by name."""

from __future__ import annotations

from llava_jax.errors import LlavaJaxError
from llava_jax.eval.tasks.base import Question, Task
from llava_jax.eval.tasks.multiple_choice import MmBench, ScienceQaImg, SeedImage
from llava_jax.eval.tasks.open_ended import LlavaBench, MmVet
from llava_jax.eval.tasks.short_answer import Gqa, TextVqa, VizWiz, VqaV2
from llava_jax.eval.tasks.yes_no import Mme, Pope

# In the order of the LLaVA-1.5 results table.
TASKS: dict[str, Task] = {t.name: t for t in (
    VqaV2(), Gqa(), VizWiz(), ScienceQaImg(), TextVqa(), Pope(), Mme(), MmBench(), SeedImage(), LlavaBench(),
    MmVet())}


def parse_tasks(text: str) -> list[Task]:
  """The tasks of a --task value ("pope,gqa"), each once; LlavaJaxError naming an unknown one."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise LlavaJaxError("--task: no task named")
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise LlavaJaxError(f"--task: unknown task {unknown[0]!r} (tasks: {', '.join(TASKS)})")
  return [TASKS[n] for n in dict.fromkeys(names)]


__all__ = ["TASKS", "Question", "Task", "parse_tasks"]
