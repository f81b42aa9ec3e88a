"""The serving error (light to import: the CLI catches it)."""


class ModelError(ValueError):
    """A saved model that is missing, damaged, or does not match the data or content it is used with."""
