"""didi: dynamic model merging made slim (DiDi-Merging) as PyTorch Lightning fit loops."""

from didi.artifact import Artifact, load_artifact
from didi.errors import DidiError

__version__ = "0.1.0"
__all__ = ["Artifact", "DidiError", "load_artifact", "__version__"]
