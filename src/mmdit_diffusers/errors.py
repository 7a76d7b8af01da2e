"""The one exception for bad input.

`InputError` is raised for an argument, config, file or folder that cannot be used (a wrong shape, an impossible
option, a missing or corrupt file), before any work starts. It is a `ValueError`, so library users catch it as
they would diffusers' own errors; the command line prints `error: <message>` and exits with status 2.
"""


SHOWN_KEYS = 5  # how many keys an error message names ("12 keys, e.g. [...]")


class InputError(ValueError):
    """Bad input: the message names the argument, the value and what was expected."""
