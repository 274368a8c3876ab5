"""The one exception type for user errors: the CLI prints its message on one line and exits 2."""


class WorkbenchError(Exception):
    """A problem the user can fix (bad input, unknown name, missing file).

    The message names the problem and the fix; code that raises it must not have written
    anything to the store yet.
    """
