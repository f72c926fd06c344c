"""Test-process environment, set before anything imports jax (subprocesses inherit it).

- 8 fake CPU devices, so sharding tests run in-process.
- A persistent XLA compilation cache shared by the test processes and the CLI subprocesses they
  start: the same tiny-model programs are compiled once per machine instead of once per process.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llava_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
