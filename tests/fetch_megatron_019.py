#!/usr/bin/env python
"""Download and unpack the megatron-core 0.19.2 wheel so its sources can shadow the venv's copy.

megatron-core >= 0.17 declares ``Requires-Python >= 3.12``, so ``pip install`` refuses it on the
Python 3.11 used here; its pure-Python sources run fine on 3.11.  This script fetches the wheel
without dependencies (``pip download --no-deps --python-version 3.12 --only-binary=:all:``),
unpacks it into DEST (default ``~/.cache/stquant_megatron/megatron-core-0.19.2``) and prints DEST,
the directory to put first on ``PYTHONPATH``.  Idempotent: does nothing if DEST already holds it.

Keep DEST outside git work trees: megatron's ``package_info.py`` runs ``git rev-parse --short HEAD``
in its own directory and appends the result to ``__version__`` (e.g. ``0.19.2+0608b10``).

    python tests/fetch_megatron_019.py [DEST] [--version 0.19.2]
    PYTHONPATH=$(python tests/fetch_megatron_019.py) python -m pytest -m megatron tests/

Check which megatron runs: ``python -c "import megatron.core as m; print(m.__version__, m.__file__)"``.
(The wheel's compiled ``datasets/helpers_cpp`` is for CPython 3.12 and is not importable on 3.11;
nothing here uses it.)
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

def _installed_version(dest: str) -> str | None:
    """``MAJOR.MINOR.PATCH[PRE]`` from DEST's package_info.py (read, not executed)."""
    info = os.path.join(dest, "megatron", "core", "package_info.py")
    if not os.path.exists(info):
        return None
    with open(info) as f:
        text = f.read()
    parts = {}
    for key in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE"):
        m = re.search(rf"^{key}\s*=\s*['\"]?([^'\"\n]*)['\"]?\s*$", text, re.M)
        parts[key] = m.group(1).strip() if m else ""
    return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{parts['PRE_RELEASE']}"


def default_dest(version: str) -> str:
    # Outside any git work tree on purpose: megatron's package_info.py appends
    # "+<git rev-parse --short HEAD>" of the directory it lives in to __version__.
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "stquant_megatron", f"megatron-core-{version}")


def fetch(version: str = "0.19.2", dest: str | None = None, quiet: bool = True) -> str:
    """Ensure megatron-core ``version`` is unpacked in ``dest``; return ``dest``."""
    dest = os.path.abspath(dest or default_dest(version))
    if _installed_version(dest) == version:
        return dest
    with tempfile.TemporaryDirectory(prefix="mcore-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.12",
               "--only-binary=:all:", f"megatron-core=={version}", "-d", tmp]
        if quiet:
            cmd.append("-q")
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        wheels = glob.glob(os.path.join(tmp, f"megatron_core-{version}-*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one megatron-core {version} wheel in {tmp}, found {wheels}")
        staging = dest + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(staging)
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(staging, dest)  # atomic: a half-unpacked tree is never visible at dest
    got = _installed_version(dest)
    if got != version:
        raise RuntimeError(f"unpacked {dest} but package_info says {got!r}, expected {version!r}")
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", nargs="?",
                    help="target directory (default: ~/.cache/stquant_megatron/megatron-core-VERSION)")
    ap.add_argument("--version", default="0.19.2")
    args = ap.parse_args(argv)
    print(fetch(args.version, args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
