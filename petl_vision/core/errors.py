"""Exceptions raised by petl_vision. Each message names the offending thing and what is accepted."""


class UnknownMethodError(ValueError):
    """A method name that no registered method has."""


class UnsupportedHostError(TypeError):
    """A method applied to a model it cannot run on."""


class AdapterFileError(ValueError):
    """An adapter directory whose files are missing pieces, corrupt or inconsistent."""


class AdapterMismatchError(ValueError):
    """An adapter saved on a different backbone than the model it is loaded onto."""


class MergeError(ValueError):
    """`merge` asked of a method that changes the architecture and cannot be folded away."""


class ConfigError(TypeError, ValueError):
    """A method config field that does not exist, or whose value has the wrong type."""
