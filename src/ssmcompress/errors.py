"""The errors every module shares (a leaf: it imports nothing of the package)."""


class ConfigError(ValueError):
    """A setting the run cannot use; raised before any model is loaded, with a one-line message that says what to
    do instead. The command line prints it as `error: <message>` and exits with status 2."""


class ModelSourceError(ConfigError):
    """A model or tokenizer source (local directory, hub name, dtype, device) that cannot be used."""
