"""lowbit: post-training compression of large language models.

Layers (imports only go downward in this list):
    formats/      pure quantize / dequantize / pack primitives
    qtensor.py    QuantizedWeight, the one record of a quantized weight
    algorithms/   RTN, GPTQ: choose codes and scales
    calibration/  calibration data -> per-block inputs and Hessians
    models/       load by name, folder or GGUF; architecture helpers
    budget/       size budgets: a bit width and group size per layer
    runtime/      QuantLinear modules that run a QuantizedWeight
    checkpoint.py save / load quantized models (safetensors + JSON manifest)
    eval/         perplexity, KL divergence, size accounting
    pipeline.py   quantize(model, recipe): ties the layers together
    cli.py        the `lowbit` command
"""

__version__ = "0.1.0"

# The Python API mirrors the CLI. Imported lazily so `import lowbit` stays light.
_API = {
    "load_model": "lowbit.models",
    "Recipe": "lowbit.recipes",
    "quantize": "lowbit.pipeline",
    "evaluate": "lowbit.evaluate",
    "save_checkpoint": "lowbit.checkpoint",
    "load_checkpoint": "lowbit.checkpoint",
    "QuantizedWeight": "lowbit.qtensor",
}

__all__ = ["__version__", *_API]  # noqa: PLE0604 - the keys of _API are strings


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
