"""Writing lowbit's quantized models in the formats other engines load: GGUF for llama.cpp
(gguf.py), compressed-tensors for vLLM and transformers (compressed_tensors.py)."""
