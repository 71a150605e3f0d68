"""Evaluation: perplexity, KL divergence against a reference, size accounting."""

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
