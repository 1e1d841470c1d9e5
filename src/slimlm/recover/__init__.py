"""Recovery after compression: knowledge distillation and LoRA on a pruned or quantized student.

Importing the package registers its stages (`distill`, `lora`) with the pipeline.
"""

from slimlm.recover import distill, lora  # noqa: F401  (registers the distill and lora stages)
