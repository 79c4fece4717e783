"""stquant-megatron: Adam moments in variable-bit (2-8 bit) packed buffers, for PyTorch and Megatron-core.

Public API: ``STQuantConfig``, ``STQuantAdamW``, ``PackedState``. The Megatron integration lives in
``stquant_megatron.megatron`` (the only sub-package that imports Megatron).
"""

from .config import STQuantConfig
from .optim import NonFiniteGradError, STQuantAdamW
from .state import PackedState

__version__ = "0.1.0"
__all__ = ["NonFiniteGradError", "PackedState", "STQuantAdamW", "STQuantConfig", "__version__"]
