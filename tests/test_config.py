"""``STQuantConfig``: validation (ValueError naming field, value and allowed range), defaults,
helpers, and the to_dict/from_dict round trip."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from stquant_megatron import STQuantConfig
from stquant_megatron.config import AUTO_CODEBOOK, DEFAULT_AVG_BITS, MOMENTS
from stquant_megatron.formats.codebooks import KINDS, LOG_STEP, get_codebook

INVALID = [
    ("bits", 1), ("bits", 9), ("bits", 0), ("bits", -4), ("bits", 4.0), ("bits", "4"), ("bits", True), ("bits", (4,)), ("bits", (4, 4, 4)), ("bits", (2, 9)), ("bits", (1, 8)), ("bits", (4, 4.0)), ("bits", (False, 4)),
    ("block_size", 16), ("block_size", 8192), ("block_size", 4096), ("block_size", 100), ("block_size", 128.0), ("block_size", 0),
    ("block_size", -128), ("block_size", "128"),
    ("min_numel", -1), ("min_numel", 1.5), ("min_numel", "0"),
    ("seed", -1), ("seed", 2**32), ("seed", 1.0), ("seed", "0"),
    ("scale_dtype", "fp16"), ("scale_dtype", torch.float32), ("scale_dtype", "FP32"),
    ("nonfinite", "ignore"), ("nonfinite", None),
    ("backend", "cuda"), ("backend", "Triton"),
    ("stochastic_rounding", 1), ("stochastic_rounding", "yes"),
    ("compile", 0), ("compile", "no"),
    ("exp_avg_codebook", "log"), ("exp_avg_codebook", "foo"), ("exp_avg_codebook", None),
    ("exp_avg_sq_codebook", "foo"), ("exp_avg_sq_codebook", "Linear"),
]  # fmt: skip


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_field_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        STQuantConfig(**{field: value})
    msg = str(info.value)
    assert f"STQuantConfig.{field}=" in msg, msg
    assert repr(value) in msg, msg
    # and says what is allowed
    assert any(word in msg for word in ("use", "choose", "must")), msg


@pytest.mark.parametrize(
    "field,value,allowed",
    [("bits", 9, "2..8"), ("block_size", 100, "power of two in 32..2048"), ("seed", -1, "0..2**32-1"),
     ("scale_dtype", "fp16", "'fp32', 'bf16'"), ("exp_avg_codebook", "log", "exp_avg_sq")],
)  # fmt: skip
def test_message_gives_allowed_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        STQuantConfig(**{field: value})
    assert allowed in str(info.value)


def test_keyword_only():
    with pytest.raises(TypeError):
        STQuantConfig(4)  # type: ignore[misc]


def test_defaults():
    c = STQuantConfig()
    assert c.bits is None and c.avg_bits == DEFAULT_AVG_BITS  # scheduled (README "Frontier" chose the budget)
    assert STQuantConfig(bits=4).avg_bits is None and STQuantConfig(bits=4).moment_bits("exp_avg") == 4  # fixed
    assert STQuantConfig(avg_bits=4.0).avg_bits == 4.0 and STQuantConfig(avg_bits=4.0).bits is None  # scheduled
    assert c.block_size == 128 and c.min_numel == 4096
    assert c.seed == 0 and c.scale_dtype == "fp32"
    # rounding: stochastic where the scheduler places widths (nearest lost 4.2 % at scheduled 3.0), else nearest
    assert c.stochastic_rounding is True and STQuantConfig(avg_bits=4.0).stochastic_rounding is True
    assert STQuantConfig(bits=4).stochastic_rounding is False
    assert STQuantConfig(avg_bits=4.0, stochastic_rounding=False).stochastic_rounding is False
    assert STQuantConfig(bits=4, stochastic_rounding=True).stochastic_rounding is True
    assert STQuantConfig.from_dict(c.to_dict()).stochastic_rounding is True
    assert c.nonfinite == "raise" and c.backend == "auto" and c.compile is None


@pytest.mark.parametrize("bits,avg_bits", [(4, 4.0), ((5, 3), 4.5), ([8, 2], DEFAULT_AVG_BITS)])
def test_bits_and_avg_bits_together_are_refused(bits, avg_bits):
    """Both given used to run the scheduler and drop ``bits`` silently: refused, with the values
    received and the two ways out."""
    with pytest.raises(ValueError) as info:
        STQuantConfig(bits=bits, avg_bits=avg_bits)
    msg = str(info.value)
    assert f"bits={bits!r}" in msg and f"avg_bits={avg_bits!r}" in msg, msg
    assert "fixed widths" in msg and "scheduler" in msg, msg
    assert STQuantConfig(bits=bits).avg_bits is None  # each alone is fine
    assert STQuantConfig(avg_bits=avg_bits).bits is None


VALID = [
    {},
    {"bits": 2}, {"bits": 8}, {"bits": (3, 5)}, {"bits": [8, 2]},
    {"block_size": 32}, {"block_size": 2048}, {"block_size": 256},
    {"min_numel": 0}, {"min_numel": 10**9},
    {"seed": 0}, {"seed": 2**32 - 1},
    {"scale_dtype": "bf16"}, {"nonfinite": "skip"}, {"nonfinite": "unchecked"},
    {"backend": "torch"}, {"backend": "triton"}, {"stochastic_rounding": True}, {"compile": True},
    {"exp_avg_codebook": "linear", "exp_avg_sq_codebook": "log"}, {"exp_avg_codebook": "pow2", "exp_avg_sq_codebook": "linear"},
    {"bits": (4, 3), "block_size": 64, "min_numel": 1, "stochastic_rounding": True, "seed": 12345, "scale_dtype": "bf16",
     "exp_avg_codebook": "linear", "exp_avg_sq_codebook": "log", "nonfinite": "skip", "backend": "torch"},
]  # fmt: skip


@pytest.mark.parametrize("kw", VALID, ids=[str(k) for k in VALID])
def test_valid_round_trip(kw):
    c = STQuantConfig(**kw)
    d = c.to_dict()
    # plain values only: JSON-like and loadable with weights_only=True
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    d2 = torch.load(buf, weights_only=True)
    assert d2 == d
    c2 = STQuantConfig.from_dict(d2)
    assert c2 == c
    assert c2.to_dict() == d
    for f in dataclasses.fields(STQuantConfig):
        assert getattr(c2, f.name) == getattr(c, f.name), f.name


def test_bits_list_becomes_tuple_and_dict_has_list():
    c = STQuantConfig(bits=[3, 5])
    assert c.bits == (3, 5)
    assert c.to_dict()["bits"] == [3, 5]
    assert STQuantConfig.from_dict(c.to_dict()).bits == (3, 5)


def test_from_dict_rejects_unknown_and_invalid():
    with pytest.raises(ValueError, match="bitz"):
        STQuantConfig.from_dict({"bitz": 4})
    d = STQuantConfig().to_dict()
    d["bits"], d["avg_bits"] = 11, None
    with pytest.raises(ValueError, match="STQuantConfig.bits=11"):
        STQuantConfig.from_dict(d)


@pytest.mark.parametrize("bits", range(2, 9))
def test_moment_bits_and_codebook(bits):
    c = STQuantConfig(bits=bits)
    for moment in MOMENTS:
        assert c.moment_bits(moment) == bits
        kind = c.codebook(moment, bits)
        assert kind == AUTO_CODEBOOK[moment][bits]
        get_codebook(kind, bits, moment == "exp_avg")  # the auto choice exists
    pair = STQuantConfig(bits=(bits, 10 - bits))
    assert pair.moment_bits("exp_avg") == bits and pair.moment_bits("exp_avg_sq") == 10 - bits
    # an explicit 'log' for exp_avg_sq falls back to pow2 where no log codebook exists
    c = STQuantConfig(exp_avg_sq_codebook="log")
    assert c.codebook("exp_avg_sq", bits) == ("log" if bits in LOG_STEP else "pow2")
    c = STQuantConfig(exp_avg_codebook="linear", exp_avg_sq_codebook="linear")
    assert c.codebook("exp_avg", bits) == "linear" and c.codebook("exp_avg_sq", bits) == "linear"


def test_auto_codebooks_are_valid_everywhere():
    for moment in MOMENTS:
        for bits, kind in AUTO_CODEBOOK[moment].items():
            assert kind in KINDS
            get_codebook(kind, bits, moment == "exp_avg")
