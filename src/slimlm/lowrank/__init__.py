# Importing the modules registers the lowrank stage and its methods.
from slimlm.lowrank import stage  # noqa: F401  (the stage and its options)
from slimlm.lowrank import eora, svd  # noqa: F401  (methods)
