"""Benchmark evaluation: scorers per task family (scoring, pope, mme, vqa, choice), the tasks that read
LLaVA's evaluation layout (tasks/), and `llava-jax eval` (runner)."""
