"""Run a Megatron-LM script with the stquant patch installed, without editing the script:

    python -m stquant_megatron.launch pretrain_gpt.py --stquant --stquant-bits 4 <megatron args>

The ``--stquant-*`` flags are registered into Megatron-LM's argument parser; without ``--stquant``
the run is stock Megatron.
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    from .megatron import patch

    patch(from_args=True)
    script, sys.argv = argv[0], argv
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
