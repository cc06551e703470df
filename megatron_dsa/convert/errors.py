"""The one error type of the conversion tools."""


class ConversionError(ValueError):
    """Bad input to a conversion, reported with one clear message before any work is done."""
