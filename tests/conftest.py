"""Test-process environment, set before anything imports jax (subprocesses inherit it).

- 8 fake CPU devices, so sharding tests run in-process (added to any XLA_FLAGS already set).
- LLVM optimization level 0: compiling, not running, is most of the tiny programs' time (xla_flags.py).
- A persistent XLA compilation cache shared by the test processes and the CLI subprocesses they
  start: the same tiny-model programs are compiled once per machine instead of once per process.
"""

import os
import tempfile

from xla_flags import with_device_count, with_fast_compile

os.environ["XLA_FLAGS"] = with_fast_compile(with_device_count(os.environ.get("XLA_FLAGS", ""), 8))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "llava_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
