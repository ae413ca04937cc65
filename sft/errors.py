"""Errors the launcher reports without a traceback. Imports nothing of the project, so every layer can raise them."""


class ConfigError(ValueError):
  """A config value that cannot work, with the reason and the key to change."""


class RunStopped(Exception):
  """Training stopped on a signal after saving a checkpoint; running the same command resumes it."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum  # what a shell reports for a process ended by that signal
