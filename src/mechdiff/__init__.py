"""mechdiff: reproducible model diffing of a base and a tuned language model."""

from mechdiff.errors import MechdiffError

__all__ = ["MechdiffError"]
__version__ = "0.1.0"
