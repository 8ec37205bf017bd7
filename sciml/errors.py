"""The one exception type whose message is shown to the user as a single line, without a traceback."""


class SciMLError(Exception):
    """A problem the user can fix: bad data, a bad override, an unknown plugin.

    The message names the file, key or value and what was expected. The CLI prints it on one line and exits
    non-zero; HYDRA_FULL_ERROR=1 shows the traceback.
    """


class DegenerateDataError(SciMLError):
    """Data that the configured metrics cannot score: an empty split, or one class where two are needed.

    Metrics raise it with what is wrong; the task adds which split (and its files) before the user sees it.
    """
