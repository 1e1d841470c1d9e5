# Importing the modules registers the lowrank stage and its methods.
from slimlm.lowrank import (  # noqa: F401  (methods)
    eora,
    stage,
    svd,
)
