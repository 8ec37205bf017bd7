"""The sweeper's user-facing error: a SciMLError that Hydra prints as one line (no traceback)."""
from hydra.errors import CompactHydraException

from sciml.errors import SciMLError


class SweepError(SciMLError, CompactHydraException):
    """A bad sweeper setting or search space, or a sweep in which every trial failed."""
