"""Put this folder on PYTHONPATH to make an unmodified Megatron-LM ``pretrain_gpt.py`` accept the
``--stquant-*`` flags: Python imports ``sitecustomize`` at interpreter start, and this one installs
``stquant_megatron.megatron.patch(from_args=True)`` (stock behaviour unless ``--stquant`` is given).

    PYTHONPATH=/path/to/stquant-megatron/patches:$PYTHONPATH torchrun ... pretrain_gpt.py --stquant ...

Set ``STQUANT_DISABLE=1`` to skip it. If your environment already has a ``sitecustomize``, import
it from here (this file shadows it) or use ``python -m stquant_megatron.launch`` instead.
"""

import os
import sys

if os.environ.get("STQUANT_DISABLE") != "1":
    try:
        from stquant_megatron.megatron import patch as _stquant_patch

        _stquant_patch(from_args=True)
    except Exception as _e:  # never break interpreter start-up; say why instead
        print(f"[stquant-megatron] patch not installed: {type(_e).__name__}: {_e}", file=sys.stderr)
