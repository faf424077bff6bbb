"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class KDBackdoorError(Exception):
    """A problem with the user's input (bad name, missing path, malformed file, ...).

    The message must say what is wrong and, where possible, which file or value.
    """
