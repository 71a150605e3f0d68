"""lowbit: post-training compression of large language models.

Layers (imports only go downward in this list):
    formats/      pure quantize / dequantize / pack primitives
    qtensor.py    QuantizedWeight, the one record of a quantized weight
    algorithms/   RTN, GPTQ: choose codes and scales
    calibration/  calibration data -> per-block inputs and Hessians
    models/       load by name, folder or GGUF; architecture helpers
    budget/       size budgets: a bit width and group size per layer
    checkpoint/   save / read records (safetensors + a versioned JSON manifest); no runtime
    runtime/      modules that run records; convert.py: to_runtime, the one module swap
    eval/         perplexity, KL divergence, size accounting from records; evaluate.py: evaluate(model,
                  datasets, ...) of a model or checkpoint; report.py: REPORT.md and `lowbit info`
    pipeline.py   quantize(model, recipe) -> QuantizedModel (records + dense tensors + reports), save
    loading.py    load(path, runtime) = checkpoint.open_checkpoint + runtime.convert.to_runtime
    cli/          the `lowbit` command, one module per command
"""

__version__ = "0.1.0"

# The Python API mirrors the CLI. Imported lazily so `import lowbit` stays light. No submodule
# may share a name with an API function: importing `lowbit.<name>` binds the module to that
# attribute of the package, and from then on it would shadow the function.
_API = {
    "load_model": "lowbit.models",
    "Recipe": "lowbit.recipes",
    "quantize": "lowbit.pipeline",
    "save": "lowbit.pipeline",
    "quantize_streamed": "lowbit.streaming",
    "evaluate": "lowbit.eval.evaluate",
    "save_checkpoint": "lowbit.checkpoint",
    "load": "lowbit.loading",
    "load_checkpoint": "lowbit.loading",
    "QuantizedModel": "lowbit.pipeline",
    "QuantizedWeight": "lowbit.qtensor",
}

__all__ = ["__version__", *_API]  # noqa: PLE0604 - the keys of _API are strings


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
