"""The one exception type whose message is shown to the user as a single line, without a traceback."""


class SciMLError(Exception):
    """A problem the user can fix: bad data, a bad override, an unknown plugin.

    The message names the file, key or value and what was expected. The CLI prints it on one line and exits
    non-zero; HYDRA_FULL_ERROR=1 shows the traceback.
    """
