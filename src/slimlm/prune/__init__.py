# Importing the modules registers the prune stage, its methods and its allocations.
from slimlm.prune import (  # noqa: F401  (methods and the OWL allocation)  # noqa: F401
    depth,
    owl,
    sparsegpt,
    unstructured,
    wanda,
    width,
)
