"""`slimlm auto`: turn a budget (file size, bits per weight or decode latency) into the best compression recipe."""
