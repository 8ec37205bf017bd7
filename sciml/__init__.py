"""sciml: train neural networks on scientific data, from a laptop to a supercomputer."""
from sciml.errors import SciMLError

__version__ = "0.1.0"
__all__ = ["SciMLError", "__version__"]
