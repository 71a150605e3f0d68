"""Evaluation: perplexity, KL divergence against a reference, size accounting.

evaluate.py (lowbit.evaluate: a model or checkpoint on datasets, against a reference) and
report.py (REPORT.md, `lowbit info`, record_evaluation) are imported by name, not from here:
they import this package, and lowbit.eval.evaluate is the module, the function is inside it."""

from lowbit.eval.kl import ComparisonResult, ReferenceLogits, compare_to_reference
from lowbit.eval.perplexity import PerplexityResult, default_seqlen, perplexity
from lowbit.eval.size import ModelSize, count_linear_params, tensor_bytes

__all__ = [
    "ComparisonResult",
    "ModelSize",
    "PerplexityResult",
    "ReferenceLogits",
    "compare_to_reference",
    "count_linear_params",
    "default_seqlen",
    "perplexity",
    "tensor_bytes",
]
