"""One exception type for every error a user can fix: the CLI prints its message as one line."""


class SlimlmError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model.

    The message must be one line that names the field, file or value at fault and what was expected.
    """
