"""Evaluation and calibration data: named datasets, local files, tokens, calibration windows."""

from lowbit.data.datasets import (
    DATASETS,
    DatasetSpec,
    calibration_documents,
    calibration_samples,
    eval_text,
    eval_tokens,
    lambada_passages,
    read_text_file,
    resolve_data_file,
)

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "calibration_documents",
    "calibration_samples",
    "eval_text",
    "eval_tokens",
    "lambada_passages",
    "read_text_file",
    "resolve_data_file",
]
