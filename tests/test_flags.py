"""One source for the ``--stquant-*`` flags: ``stquant_megatron/megatron/args.py``.

The README and ``docs/megatron.md`` flag tables are generated from its parser
(``stquant-megatron flags --write README.md docs/megatron.md``); these tests fail when a table is
stale, when a document names a flag that does not exist, when ``docs/scheduler.md`` gives a field
another (or no) flag, or when a config field has no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import pytest

from stquant_megatron.config import STQuantConfig
from stquant_megatron.megatron.args import add_stquant_args, config_from_args, render_flag_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/megatron.md", "docs/scheduler.md", "docs/formats.md"]


def _read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def _parser():
    return add_stquant_args(argparse.ArgumentParser(add_help=False))


def _flag_of_field():
    return {a.dest[len("stquant_"):]: a.option_strings[0] for a in _parser()._actions
            if a.dest.startswith("stquant_")}  # fmt: skip


@pytest.mark.parametrize("rel", ["README.md", "docs/megatron.md"])
def test_generated_flag_tables_are_current(rel):
    text = _read(rel)
    assert render_flag_block(text, rel) == text, f"{rel}: run `stquant-megatron flags --write {rel}`"


@pytest.mark.parametrize("rel", DOCS)
def test_documents_name_only_existing_flags(rel):
    known = {a.option_strings[0] for a in _parser()._actions if a.option_strings}
    named = set(re.findall(r"--stquant(?:-[a-z0-9]+)*", _read(rel)))
    assert named <= known, sorted(named - known)


def test_scheduler_doc_gives_every_field_its_flag():
    flags = _flag_of_field()
    rows = re.findall(r"^\| `([a-z_]+)` \| [^|]* \| ([^|]*) \|", _read("docs/scheduler.md"), re.M)
    assert len(rows) >= 10, rows
    for field, cell in rows:
        if field in flags:
            assert cell.strip() == f"`{flags[field]}`", (field, cell, flags[field])


def test_every_config_field_has_a_flag_and_round_trips():
    fields = {f.name for f in dataclasses.fields(STQuantConfig)}
    # nonfinite: Megatron checks gradients itself; config_from_args pins it to "unchecked".
    # checkpoint_format: not a config field (how Megatron checkpoints are written: patch(checkpoint_format=))
    assert set(_flag_of_field()) - {"checkpoint_format"} == fields - {"nonfinite"}
    assert _parser().parse_args(["--stquant"]).stquant_checkpoint_format == "dense"
    assert _parser().parse_args(["--stquant", "--stquant-checkpoint-format", "packed"]).stquant_checkpoint_format == "packed"
    args = _parser().parse_args(
        ["--stquant", "--stquant-avg-bits", "4.5", "--stquant-stats-steps", "3",
         "--stquant-max-move", "1", "--stquant-hysteresis", "0.05", "--stquant-exp-avg-sq-codebook", "log",
         "--stquant-backend", "torch", "--stquant-block-size", "64", "--stquant-exp-avg-sq-format", "packed"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.exp_avg_sq_format == "packed"
    assert (cfg.bits, cfg.avg_bits, cfg.stats_steps, cfg.max_move, cfg.hysteresis) == (None, 4.5, 3, 1, 0.05)
    fixed = config_from_args(_parser().parse_args(["--stquant", "--stquant-bits", "5,3"]))
    assert (fixed.bits, fixed.avg_bits) == ((5, 3), None)
    assert (cfg.exp_avg_sq_codebook, cfg.backend, cfg.block_size, cfg.nonfinite) == ("log", "torch", 64, "unchecked")
    defaults = config_from_args(_parser().parse_args(["--stquant"]))
    assert dataclasses.replace(defaults, nonfinite="raise") == STQuantConfig()


@pytest.mark.parametrize("bits,avg", [("4", "4.0"), ("5,3", "4.5")])
def test_bits_and_avg_bits_flags_together_are_refused(bits, avg):
    """--stquant-bits with --stquant-avg-bits used to run the scheduler and drop the fixed width
    silently; the pair is refused, naming both flags, the values and the two ways out."""
    args = _parser().parse_args(["--stquant", "--stquant-bits", bits, "--stquant-avg-bits", avg])
    with pytest.raises(ValueError) as info:
        config_from_args(args)
    msg = str(info.value)
    assert f"--stquant-bits {bits}" in msg and f"--stquant-avg-bits {float(avg):g}" in msg, msg
    assert "fixed widths" in msg and "scheduler" in msg, msg
