"""One exception type for bad input, so CLIs can print it without a traceback."""


class InputError(ValueError):
    """Bad user input: a wrong file, key, shape, dtype, range or name.

    The message always names the offending thing, what was expected and what was found.
    """


class OutputError(OSError):
    """An output could not be written (full disk, no permission, read-only file system).

    The message names the file and the cause; the previous version of the file is left as it was.
    """


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite: the message names the epoch and the batch, and
    the last checkpoint (of the last good epoch) is kept."""
