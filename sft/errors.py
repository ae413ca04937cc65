"""Errors the launcher reports without a traceback. Imports nothing of the project, so every layer can raise them."""


class ConfigError(ValueError):
  """A config value that cannot work, with the reason and the key to change."""
