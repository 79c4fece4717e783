"""Fork-free Megatron-core integration (the only sub-package that imports Megatron).

``patch(config)`` makes ``megatron.core.optimizer.get_megatron_optimizer`` build
``DistributedOptimizer``s whose inner optimizer is ``STQuantAdamW`` (packed moments), whatever
TE/apex/torch Adam Megatron would have picked, and routes every checkpoint format through dense
fp32 moments. ``unpatch()`` restores stock behaviour. See ``docs/megatron.md``.
"""

from .args import add_stquant_args, config_from_args
from .patch import SUPPORTED_VERSIONS, is_patched, patch, unpatch

__all__ = ["SUPPORTED_VERSIONS", "add_stquant_args", "config_from_args", "is_patched", "patch", "unpatch"]
