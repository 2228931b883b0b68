"""One exception type for bad input, so CLIs can print it without a traceback."""


class InputError(ValueError):
    """Bad user input: a wrong file, key, shape, dtype, range or name.

    The message always names the offending thing, what was expected and what was found.
    """
