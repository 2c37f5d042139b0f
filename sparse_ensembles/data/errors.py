class DataError(RuntimeError):
    """A dataset is missing or corrupt; the message says what was expected and how to fix it."""
