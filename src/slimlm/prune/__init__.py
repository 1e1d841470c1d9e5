from slimlm.prune import unstructured  # noqa: F401  (registers the prune stage)
