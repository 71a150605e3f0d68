"""llama.cpp's (ggml's) quantized block types, each one small class (base.BlockType).

BLOCK_TYPES maps llama.cpp's type name ("Q4_K") to the type. The types live by family:
legacy.py (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), kquants.py (Q2_K ... Q6_K), iq4.py (IQ4_NL, IQ4_XS).
"""

from __future__ import annotations

from lowbit.formats.ggml import iq4, kquants, legacy
from lowbit.formats.ggml.base import BlockType, blocks_of

BLOCK_TYPES: dict[str, BlockType] = {bt.name: bt for family in (legacy, kquants, iq4) for bt in family.TYPES}

__all__ = ["BLOCK_TYPES", "BlockType", "blocks_of"]
