"""Established quantizers run as peers of lowbit's own, in the same benchmark run.

Each peer quantizes a model's named nn.Linear layers in place (simulated quantization) and
returns a PeerResult. Peer packages are optional (`pip install 'lowbit[peers]'`) and imported
only when a peer runs.
"""

from lowbit.peers.hqq import PeerResult, hqq_quantize_model

__all__ = ["PeerResult", "hqq_quantize_model"]
