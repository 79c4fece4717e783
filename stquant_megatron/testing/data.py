"""Real text that needs no download: the Python standard library's own source files.

A byte-level corpus (vocabulary 256) from a fixed list of modules that exist in CPython 3.10-3.13.
``TRAIN_FILES`` and ``VAL_FILES`` are disjoint whole files, so validation text is held out.
"""

from __future__ import annotations

import pathlib
import sysconfig

import torch

TRAIN_FILES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "csv.py", "dataclasses.py", "difflib.py",
    "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py", "inspect.py", "pickle.py",
    "pprint.py", "random.py", "shutil.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py",
    "textwrap.py", "threading.py", "tokenize.py", "traceback.py", "typing.py",
)  # fmt: skip
VAL_FILES = ("ftplib.py", "imaplib.py", "mailbox.py", "smtplib.py")


def stdlib_corpus(split: str) -> torch.Tensor:
    """uint8 -> int64 tokens of the ``"train"`` or ``"val"`` files, concatenated in list order."""
    files = {"train": TRAIN_FILES, "val": VAL_FILES}.get(split)
    if files is None:
        raise ValueError(f"split={split!r}: use 'train' or 'val'")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"standard-library files {missing} not found under {root}")
    data = b"".join((root / f).read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def lm_batches(tokens: torch.Tensor, *, batch: int, seq: int, steps: int, seed: int):
    """``steps`` (inputs, targets) pairs of shape [batch, seq], a fixed order from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq - 1, (steps, batch), generator=gen)
    offs = torch.arange(seq)
    for row in starts:
        idx = row[:, None] + offs
        yield tokens[idx], tokens[idx + 1]
