"""``stquant-megatron memory`` (``stquant_megatron/megatron/memory.py``) against real megatron-core runs.

The estimate is arithmetic from the flags; every check here measures the same quantity on a real
model built by megatron-core on CPU ranks (gloo): (a) the parameter count of ``GPTModel`` for several
shapes, and the per-rank count under TP=2; (b) the optimizer-state bytes per rank of a DP=2 run,
stock (torch AdamW's fp32 moments) and patched (``STQuantAdamW.state_bytes()``, fixed 4 bits, and
4 bits with a factored exp_avg_sq); (c) the bytes on disk of ``dp_reshardable`` checkpoints written by
that run, stock and patched.
"""

from __future__ import annotations

import json
import os

import pytest

from stquant_megatron.cli import main as cli_main
from stquant_megatron.megatron.memory import GPTShape, estimate, parse_count
from stquant_megatron.testing import run_distributed

# the shapes of (a): keyword arguments of estimate(), and what build_gpt_model gets for them
SHAPES = {
    "default": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=32,
                    position_embedding_type="rope"),
    "llama-like": dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                       vocab_size=300, make_vocab_size_divisible_by=1, seq_length=48, swiglu=True,
                       untie_embeddings_and_output_weights=True, normalization="RMSNorm", add_bias_linear=False,
                       position_embedding_type="learned_absolute"),
    "moe": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=32,
                position_embedding_type="rope", num_experts=4, moe_ffn_hidden_size=48),
}


def _build(kw: dict):
    """``build_gpt_model`` for estimate() keyword arguments ``kw``; returns the chunks."""
    from stquant_megatron.testing import gpt

    cfg = dict(num_layers=kw["num_layers"], hidden_size=kw["hidden_size"], num_attention_heads=kw["num_attention_heads"],
               bf16=kw.get("bf16", True))
    if kw.get("ffn_hidden_size"):
        cfg["ffn_hidden_size"] = kw["ffn_hidden_size"]
    if kw.get("num_query_groups"):
        cfg["num_query_groups"] = kw["num_query_groups"]
    if kw.get("swiglu"):
        import torch.nn.functional as F

        cfg.update(gated_linear_unit=True, activation_func=F.silu)
    if kw.get("normalization"):
        cfg["normalization"] = kw["normalization"]
    if "add_bias_linear" in kw:
        cfg["add_bias_linear"] = kw["add_bias_linear"]
    layer_spec = None
    if kw.get("num_experts"):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        cfg.update(num_moe_experts=kw["num_experts"], moe_ffn_hidden_size=kw["moe_ffn_hidden_size"], moe_router_topk=2)
        layer_spec = get_gpt_layer_local_spec(num_experts=kw["num_experts"], moe_grouped_gemm=False)
    return gpt.build_gpt_model(seq_length=kw["seq_length"], vocab_size=kw["vocab_size"],
                               share_embeddings=not kw.get("untie_embeddings_and_output_weights", False),
                               position_embedding_type=kw["position_embedding_type"], layer_spec=layer_spec, **cfg)


def _count_params(rank, world, specs, tp):
    """Each shape's parameter count on this rank (TP-local), from the built model."""
    from megatron.core.utils import unwrap_model

    from stquant_megatron.testing import init_megatron_parallel

    out = {}
    for name, kw in specs.items():
        init_megatron_parallel(tp, 1)
        model = unwrap_model(_build(kw))
        out[name] = sum(p.numel() for m in model for p in m.parameters())
    return out


@pytest.mark.megatron
def test_parameter_count_matches_gptmodel():
    """(a) The shape's count equals GPTModel's, on 1 rank; per GPU under TP=2 (vocab padded for TP)."""
    got = run_distributed(_count_params, 1, SHAPES, 1, timeout=120)[0]
    for name, kw in SHAPES.items():
        assert GPTShape(**kw).num_parameters() == got[name], name
        assert estimate(**kw)["per_gpu"]["params"] == got[name], name
    tp2 = {k: SHAPES[k] for k in ("default", "llama-like")}
    tp2["llama-like"] = dict(tp2["llama-like"], vocab_size=302)  # divisible by TP=2, as Megatron pads it
    per_rank = run_distributed(_count_params, 2, tp2, 2, timeout=120)
    for name, kw in tp2.items():
        want = estimate(**kw, tensor_model_parallel_size=2)["per_gpu"]["params"]
        assert [r[name] for r in per_rank] == [want, want], name
        assert want < GPTShape(**kw).num_parameters()  # TP really split something


# the model of (b) and (c): large enough that the checkpoint's metadata is small beside its tensors
MODEL = dict(num_layers=2, hidden_size=256, num_attention_heads=4, vocab_size=256, seq_length=32,
             position_embedding_type="rope")


def _state_and_checkpoints(rank, world, tmp, configs):
    """DP=2: for stock and each STQuant config, build, take one step, measure the optimizer state of
    this rank, save a dp_reshardable checkpoint."""
    import torch

    from stquant_megatron import STQuantConfig
    from stquant_megatron.megatron import patch, unpatch
    from stquant_megatron.testing import gpt, init_megatron_parallel

    out = {}
    for name, cfg in configs.items():
        init_megatron_parallel(1, 1)
        if cfg is None:
            unpatch()
        else:
            patch(STQuantConfig(**cfg))
        model = _build(MODEL)
        opt = gpt.build_optimizer(model)
        gpt.train(model, opt, 1, seq_length=MODEL["seq_length"])
        inners = [d.optimizer for d in gpt.distributed_optimizers(opt)]
        if cfg is None:  # torch AdamW: its fp32 moments (the step counters are not moments)
            out[name] = sum(v.numel() * v.element_size() for i in inners for st in i.state.values()
                            for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))  # fmt: skip
        else:
            out[name] = sum(i.state_bytes() for i in inners)
        gpt.save_checkpoint(model, opt, os.path.join(tmp, name), "dp_reshardable")
        if cfg is not None:
            gpt.save_checkpoint(model, opt, os.path.join(tmp, name + "_packed"), "packed")
        unpatch()
        del model, opt
        torch.distributed.barrier()
    return out


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("memory_ckpt"))
    configs = {"stock": None, "bits4": dict(bits=4, exp_avg_sq_format="packed", compile=False),
               "bits4_factored": dict(bits=4, exp_avg_sq_format="factored", compile=False)}  # no compile: 30 s
    ranks = run_distributed(_state_and_checkpoints, 2, tmp, configs, timeout=240)
    return tmp, ranks


@pytest.mark.megatron
@pytest.mark.parametrize("name,flags", [
    ("stock", {}),
    ("bits4", dict(stquant_bits=4)),
    ("bits4_factored", dict(stquant_bits=4, stquant_exp_avg_sq_format="factored")),
])
def test_optimizer_state_per_rank(dp2_run, name, flags):
    """(b) Predicted moment bytes per GPU at DP=2 against each rank's measured state.

    Stock: exact up to where the DP shard boundary falls (64-element alignment of every tensor and
    the bucket padding: under 1%). STQuant, per rank: within the estimate's ``moments_ours_slack``
    (one block of padding per moment per tensor shard, step counters, alignment, and where the fp32
    escapes of tensors under min_numel fall between the two ranks); the sum over ranks, where the
    escapes' placement cancels out, within 1% (without the scale term the estimate would be 6% short), and at most
    one rank's factored statistics short of it (the estimate's upper bound for them)."""
    _, ranks = dp2_run
    est = estimate(**MODEL, data_parallel_size=2, **flags)["per_gpu"]
    measured = [r[name] for r in ranks]
    if name == "stock":
        for m in measured:
            assert abs(m - est["moments_stock"]) <= 0.01 * est["moments_stock"], (m, est["moments_stock"])
        return
    pred, slack = est["moments_ours"], est["moments_ours_slack"]
    for m in measured:
        assert abs(m - pred) <= slack, (name, m, pred, slack)
    total = sum(measured)
    # factored statistics: the estimate counts every matrix's on each rank (an upper bound); a rank
    # keeps those of the matrices it holds part of, so the sum may be short of them on one rank
    below = est["factored_stats"]
    assert -0.01 * 2 * pred - below <= total - 2 * pred <= 0.01 * 2 * pred, (name, measured, pred, below)
    if name == "bits4":  # the formula itself: 2 x (4 + 32/128) / 8 B per packed element, fp32 escapes
        assert 2 * pred < est["moments_stock"] * 2 / 3


@pytest.mark.megatron
def test_checkpoint_bytes_on_disk(dp2_run):
    """(c) Predicted checkpoint bytes against the files of real dp_reshardable checkpoints: never
    below the prediction and at most 2% above it. The excess is a fixed cost per tensor, not per
    byte: ``.metadata`` (~40 KB here), a header of ~0.6 KB per tensor piece in the ``.distcp`` files
    (every parameter's slice of every key, and the padding pieces, on each rank: ~300 pieces here,
    ~3.7% of a hidden-128 model's checkpoint, ~1% of this one's, nothing at 7B), ``common.pt`` and the
    64-element alignment padding inside the buckets. STQuant's dense checkpoint is the size of stock's
    (its non-tensor state adds a little); its packed one holds the moments as in memory, plus a layout
    of a few hundred bytes per parameter shard and moment (~2 % of this small model's packed checkpoint)."""
    tmp, _ = dp2_run
    n = GPTShape(**MODEL).num_parameters()
    for name, flags in (("bits4", {}), ("bits4_factored", dict(stquant_exp_avg_sq_format="factored"))):
        ck = estimate(**MODEL, data_parallel_size=2, stquant_bits=4, **flags)["checkpoint"]
        assert ck["stock"] == ck["ours_dense"] == 14 * n
        for kind in ("stock", name):
            on_disk = _dir_bytes(os.path.join(tmp, kind))
            assert ck["stock"] <= on_disk <= 1.02 * ck["stock"], (kind, on_disk, ck["stock"])
        on_disk = _dir_bytes(os.path.join(tmp, name + "_packed"))
        assert ck["ours_packed"] <= on_disk <= 1.04 * ck["ours_packed"], (name, on_disk, ck["ours_packed"])
        assert on_disk < 0.55 * ck["stock"], (name, on_disk, ck["stock"])
    ck = estimate(**MODEL, data_parallel_size=2, stquant_bits=4)["checkpoint"]
    packed = (2 + 4 + 2 * 4.25 / 8) * n  # weights, fp32 params, 4-bit moments (escapes, under 1%, cost 8 B instead)
    assert packed <= ck["ours_packed"] <= packed + 0.01 * 8 * n


def test_cli_table_and_json(capsys):
    """The CLI is the library function: --json is estimate()'s dict, the table shows its numbers."""
    argv = ["memory", "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "11008",
            "--num-attention-heads", "32", "--vocab-size", "32000", "--seq-length", "4096", "--swiglu",
            "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--normalization", "RMSNorm",
            "--position-embedding-type", "rope", "--bf16", "--world-size", "8", "--stquant-bits", "4"]
    assert cli_main(argv + ["--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["inputs"]["num_parameters"] == 6_738_415_616  # Llama-2-7B
    assert est["inputs"]["data_parallel_size"] == 8
    g = est["per_gpu"]
    n = 6_738_415_616
    assert (g["model_params"], g["grad_buffer"], g["main_params"], g["moments_stock"]) == (2 * n, 4 * n, n // 2, n)
    assert abs(g["moments_ours"] - n / 8 * 2 * 4.25 / 8) < 1e-3 * n  # escapes (norms) are 0.004% here
    assert cli_main(argv) == 0
    table = capsys.readouterr().out
    assert "6,738,415,616 parameters" in table and "checkpoint" in table and "STQuant, packed moments" in table
    with pytest.raises(SystemExit):  # exclusive, as the launch flags
        cli_main(["memory", "--num-parameters", "7B", "--stquant-bits", "4", "--stquant-avg-bits", "4"])
    assert cli_main(["memory", "--num-parameters", "7B", "--world-size", "12", "--tensor-model-parallel-size", "8"]) == 2


def test_parse_count_and_defaults():
    assert parse_count("7e9") == parse_count("7B") == parse_count("7b") == 7 * 10**9
    assert parse_count("70B") == 70 * 10**9 and parse_count("350M") == 350 * 10**6 and parse_count(1000) == 1000
    with pytest.raises(ValueError):
        parse_count("seven")
    from stquant_megatron.config import DEFAULT_AVG_BITS

    st = estimate(num_parameters="1B")["inputs"]["stquant"]
    assert st["exp_avg_bits_per_element"] == st["exp_avg_sq_bits_per_element"] == DEFAULT_AVG_BITS
    # Megatron-LM's defaults: SwiGLU ffn int(8h/3/64)*64; vocabulary padded to 128 x TP
    s = GPTShape(num_layers=1, hidden_size=4096, num_attention_heads=32, vocab_size=32000, swiglu=True, seq_length=8)
    assert s.ffn == 10880 and s.padded_vocab(8) == 32768
    g = estimate(num_parameters="8B", tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                 data_parallel_size=4, precision="fp32", stquant_bits=8)["per_gpu"]
    assert g["params"] == 2 * 10**9 and g["main_params"] == 0 and g["model_params"] == g["grad_buffer"] == 8 * 10**9
