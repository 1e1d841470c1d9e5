# Importing the modules registers the prune stage, its methods and its allocations.
from slimlm.prune import unstructured  # noqa: F401  (the stage, magnitude, uniform allocation)
from slimlm.prune import owl, sparsegpt, wanda  # noqa: F401  (methods and the OWL allocation)
from slimlm.prune import depth, width  # noqa: F401
