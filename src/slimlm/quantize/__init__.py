from slimlm.quantize import (  # noqa: F401  (registers the quantize stage and its methods)
    awq,
    gptq,
    rtn,
    share,
    smoothquant,
    stage,
)
