from slimlm.quantize import gptq, rtn, stage  # noqa: F401  (registers the quantize stage and its methods)
from slimlm.quantize import awq  # noqa: F401
from slimlm.quantize import smoothquant  # noqa: F401
from slimlm.quantize import share  # noqa: F401  (registers the share stage: k-means weight clustering, layer tying)
