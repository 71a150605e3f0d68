"""lowbit: post-training compression of large language models.

Layers (imports only go downward in this list):
    formats/      pure quantize / dequantize / pack primitives
    qtensor.py    QuantizedWeight, the one record of a quantized weight
    algorithms/   RTN, GPTQ: choose codes and scales
    calibration/  calibration data -> per-block inputs and Hessians
    models/       load by name, folder or GGUF; architecture helpers
    runtime/      QuantLinear modules that run a QuantizedWeight
    checkpoint.py save / load quantized models (safetensors + JSON manifest)
    eval/         perplexity, KL divergence, size accounting
    pipeline.py   quantize(model, recipe): ties the layers together
    cli.py        the `lowbit` command
"""

__version__ = "0.1.0"
