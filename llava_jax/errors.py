"""Errors a user can cause. The CLI turns them into one line on stderr and exit code 2."""


class LlavaJaxError(Exception):
  """Bad input: a path, config key, flag, checkpoint or data file that cannot be used.

  The message is one line that names the offending file/key/value (and expected vs got).
  """
