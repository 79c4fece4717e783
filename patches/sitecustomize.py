"""Put this folder on PYTHONPATH to make an unmodified Megatron-LM ``pretrain_gpt.py`` accept the
``--stquant-*`` flags:

    PYTHONPATH=/path/to/stquant-megatron/patches:$PYTHONPATH torchrun ... pretrain_gpt.py --stquant ...

Python imports ``sitecustomize`` at every interpreter start, so this file is light: it imports
nothing but the standard library and registers an import hook. The first time
``megatron.core.optimizer`` (which Megatron-LM's training module imports) finishes importing, the
hook runs ``stquant_megatron.megatron.patch(from_args=True)`` (stock behaviour unless ``--stquant``
is given); processes that never import Megatron (``pip``, ``python -c ...``, checkpoint helpers)
pay nothing.

Set ``STQUANT_DISABLE=1`` to skip it. If your environment already has a ``sitecustomize``, import
it from here (this file shadows it) or use ``python -m stquant_megatron.launch`` instead.
"""

import os
import sys

_TRIGGER = "megatron.core.optimizer"


def _install_patch(module):
    try:
        from stquant_megatron.megatron import patch

        patch(from_args=True)
    except Exception as e:  # never break the user's import; say why instead
        print(f"[stquant-megatron] patch not installed: {type(e).__name__}: {e}", file=sys.stderr)


class _StquantImportHook:
    """Meta-path finder that lets ``_TRIGGER`` import normally, then installs the patch (once)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _install_patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("STQUANT_DISABLE") != "1":
    if _TRIGGER in sys.modules:  # cannot happen at interpreter start; kept for explicit imports
        _install_patch(sys.modules[_TRIGGER])
    else:
        sys.meta_path.insert(0, _StquantImportHook())
