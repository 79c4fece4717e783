"""Per-GPU memory and checkpoint bytes of a Megatron GPT run, stock against STQuant (``stquant-megatron memory``).

Pure arithmetic (no Megatron import): ``estimate(...)`` takes Megatron-LM's own argument names and
returns a dict; ``format_table`` renders it. What is modelled, and what is assumed:

* **Parameters.** Either a count (``num_parameters``: then every GPU is assumed to hold
  ``N / (TP x PP)`` of them and no tensor is assumed to be under ``min_numel``) or a GPT shape, whose
  tensors are listed the way megatron-core's ``GPTModel`` builds them (local or Transformer Engine
  layer spec alike): word embeddings ``padded_vocab x h`` (vocabulary padded to a multiple of
  ``make_vocab_size_divisible_by x TP``, as Megatron-LM's tokenizer builder does), learned position
  embeddings ``max_position_embeddings x h`` (``--position-embedding-type learned_absolute``,
  Megatron-LM's default; none with rope), per layer two norms (``h``, plus a bias with LayerNorm),
  ``linear_qkv`` ``(heads + 2 x query_groups) x kv_channels`` rows, ``linear_proj``, ``linear_fc1``
  (``2 x ffn`` rows with SwiGLU), ``linear_fc2`` (biases unless ``--disable-bias-linear``), the final
  norm and an untied ``output_layer``. MoE (``num_experts``): every layer's MLP is a router
  (``experts x h``, a bias with biases on) and ``num_experts`` expert MLPs of ``moe_ffn_hidden_size``, split over EP.
* **Sharding.** TP splits the column/row-parallel matrices, their column-parallel biases and the
  vocabulary; norms, row-parallel biases, position embeddings and the router are replicated on every
  TP rank. PP splits the layers evenly; the first stage also holds the embeddings, the last one the
  final norm and the output layer (with tied embeddings and PP > 1, the last stage holds a second
  copy of the word embeddings, as Megatron does). The busiest stage is reported.
* **Per GPU** (activations, CUDA context, allocator slack and communication buffers not included):
  model params (2 B with bf16/fp16, 4 B with fp32); DDP's gradient buffer, held whole by every rank
  (4 B: Megatron-LM sets ``accumulate_allreduce_grads_in_fp32`` with ``--bf16`` unless
  ``--grad-reduce-in-bf16``; fp16 keeps 2 B unless ``--accumulate-allreduce-grads-in-fp32``; fp32: 4 B);
  fp32 main params (with bf16/fp16: 4 B / DP, the distributed optimizer's shard; fp32 runs use the
  model params themselves); Adam's moments (stock: 8 B / DP; ours: ``(b + scale_bits / block) / 8``
  B per moment and element at fixed ``b`` bits, ``avg_bits / 8`` under the scheduler, whose budget
  bounds the peak and includes scale bits; tensors under ``min_numel`` keep fp32 moments; a factored
  ``exp_avg_sq`` costs 4 B per row and column of every matrix of the stage on each data-parallel
  rank, an upper bound: only ranks holding part of a matrix keep its statistics). Expert parameters
  are sharded over the expert data-parallel group, ``DP x TP / (expert TP x EP)``, expert TP = TP.
* **Checkpoint** (``--ckpt-format torch_dist``, ``dp_reshardable``, the whole model): the model
  weights once (2 or 4 B) plus the distributed optimizer's buffers of every (TP, PP) domain in fp32:
  ``param`` (4 B) and both moments (8 B) per element, so tensors replicated over TP, and a tied
  embedding's second copy, count once per holder. STQuant writes the same dense fp32 moments by
  default (``--stquant-checkpoint-format dense``: its checkpoints load into stock Megatron and back);
  with ``--stquant-checkpoint-format packed`` the moments are written as they are in memory
  (``packed_checkpoint``): the in-memory moment bytes of every element once, params and weights as stock.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..config import DEFAULT_AVG_BITS

GIB = 2**30
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str | int | float) -> int:
    """``"7e9"``, ``"70B"``, ``"6.7b"``, ``"350M"``, ``"1.5T"``, ``7000000000`` -> an int."""
    if isinstance(text, (int, float)):
        return int(round(text))
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a parameter count (e.g. 7e9, 70B, 6.7b, 350M)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value < 1:
        raise ValueError(f"{text!r}: a parameter count must be at least 1")
    return int(round(value))


def vocab_size_with_padding(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padded vocabulary: a multiple of ``divisible_by x TP``."""
    multiple = max(1, divisible_by) * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor as a single GPU holds it."""

    name: str
    shape: tuple[int, ...]  # on one TP rank
    part: str  # "embedding", "layer", "final", "output"
    tp_split: bool
    expert: bool = False
    count: int = 1  # identical tensors (layers or local experts) folded into one entry

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GPTShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    seq_length: int | None = None
    max_position_embeddings: int | None = None
    swiglu: bool = False
    untie_embeddings_and_output_weights: bool = False
    position_embedding_type: str = "learned_absolute"
    normalization: str = "LayerNorm"
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    make_vocab_size_divisible_by: int = 128
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None

    def __post_init__(self):
        for field in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, field) is None or getattr(self, field) < 1:
                raise ValueError(f"GPT shape: {field} must be a positive int, got {getattr(self, field)!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("GPT shape: hidden_size must be divisible by num_attention_heads (or give kv_channels)")
        if self.num_attention_heads % self.query_groups:
            raise ValueError("GPT shape: num_attention_heads must be divisible by num_query_groups")
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r}: learned_absolute, rope or none")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization {self.normalization!r}: LayerNorm or RMSNorm")
        if self.position_embedding_type == "learned_absolute" and self.max_positions is None:
            raise ValueError("learned_absolute position embeddings need seq_length or max_position_embeddings")

    @property
    def ffn(self) -> int:
        """Megatron-LM's default: 4h, or int(8h/3 / 64) * 64 with SwiGLU."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return int((4 * self.hidden_size * 2 / 3) / 64) * 64 if self.swiglu else 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def max_positions(self) -> int | None:
        return self.max_position_embeddings or self.seq_length

    def padded_vocab(self, tp: int) -> int:
        return vocab_size_with_padding(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def tensors(self, tp: int = 1, ep: int = 1, vocab_tp: int | None = None) -> list[Tensor]:
        """Every distinct parameter tensor of the model on one (TP, EP) rank; ``count`` folds layers.
        ``vocab_tp``: the TP size the vocabulary is padded for (default ``tp``)."""
        h, L, kv = self.hidden_size, self.num_layers, self.kv
        norm = lambda name, part, n=h, count=L: [Tensor(f"{name}.weight", (n,), part, False, count=count)] + (  # noqa: E731
            [Tensor(f"{name}.bias", (n,), part, False, count=count)] if self.normalization == "LayerNorm" else [])
        bias = self.add_bias_linear

        def split(n: int, what: str, by: int = tp) -> int:
            if n % by:
                raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {by}")
            return n // by

        qkv = split((self.num_attention_heads + 2 * self.query_groups) * kv, "query/key/value projection")
        proj_in = split(self.num_attention_heads * kv, "attention projection")
        if self.query_groups % tp:
            raise ValueError(f"num_query_groups ({self.query_groups}) is not divisible by the tensor-parallel size {tp}")
        out: list[Tensor] = []
        V = split(self.padded_vocab(vocab_tp or tp), "padded vocabulary")
        out.append(Tensor("embedding.word_embeddings.weight", (V, h), "embedding", True))
        if self.position_embedding_type == "learned_absolute":
            out.append(Tensor("embedding.position_embeddings.weight", (self.max_positions, h), "embedding", False))
        pre = "decoder.layers.*"
        out += norm(f"{pre}.input_layernorm", "layer")
        out.append(Tensor(f"{pre}.self_attention.linear_qkv.weight", (qkv, h), "layer", True, count=L))
        if bias or self.add_qkv_bias:
            out.append(Tensor(f"{pre}.self_attention.linear_qkv.bias", (qkv,), "layer", True, count=L))
        if self.qk_layernorm:
            out += norm(f"{pre}.self_attention.q_layernorm", "layer", kv) + norm(f"{pre}.self_attention.k_layernorm", "layer", kv)
        out.append(Tensor(f"{pre}.self_attention.linear_proj.weight", (h, proj_in), "layer", True, count=L))
        if bias:
            out.append(Tensor(f"{pre}.self_attention.linear_proj.bias", (h,), "layer", False, count=L))
        out += norm(f"{pre}.pre_mlp_layernorm", "layer")
        gate = 2 if self.swiglu else 1
        if self.num_experts:
            E = self.num_experts
            if E % ep:
                raise ValueError(f"num_experts ({E}) is not divisible by the expert-parallel size {ep}")
            f = self.moe_ffn_hidden_size or self.ffn
            local = L * (E // ep)
            mlp = f"{pre}.mlp.experts.local_experts.*"
            out.append(Tensor(f"{pre}.mlp.router.weight", (E, h), "layer", False, count=L))
            if bias:
                out.append(Tensor(f"{pre}.mlp.router.bias", (E,), "layer", False, count=L))
            out.append(Tensor(f"{mlp}.linear_fc1.weight", (split(gate * f, "expert fc1"), h), "layer", True, True, local))
            if bias:
                out.append(Tensor(f"{mlp}.linear_fc1.bias", (split(gate * f, "expert fc1"),), "layer", True, True, local))
            out.append(Tensor(f"{mlp}.linear_fc2.weight", (h, split(f, "expert fc2")), "layer", True, True, local))
            if bias:
                out.append(Tensor(f"{mlp}.linear_fc2.bias", (h,), "layer", False, True, local))
        else:
            f = self.ffn
            out.append(Tensor(f"{pre}.mlp.linear_fc1.weight", (split(gate * f, "fc1"), h), "layer", True, count=L))
            if bias:
                out.append(Tensor(f"{pre}.mlp.linear_fc1.bias", (split(gate * f, "fc1"),), "layer", True, count=L))
            out.append(Tensor(f"{pre}.mlp.linear_fc2.weight", (h, split(f, "fc2")), "layer", True, count=L))
            if bias:
                out.append(Tensor(f"{pre}.mlp.linear_fc2.bias", (h,), "layer", False, count=L))
        out += norm("decoder.final_layernorm", "final", count=1)
        if self.untie_embeddings_and_output_weights:
            out.append(Tensor("output_layer.weight", (V, h), "output", True))
        return out

    def num_parameters(self, tp: int = 1) -> int:
        """The model's parameter count (one copy of tied embeddings), as ``GPTModel`` has it, with the
        vocabulary padded for TP = ``tp``."""
        return sum(t.numel * t.count for t in self.tensors(1, 1, vocab_tp=tp))


def _stage_tensors(shape: GPTShape, tp: int, pp: int, ep: int, stage: int) -> list[Tensor]:
    """The tensors one GPU of pipeline stage ``stage`` holds (layers counted per stage)."""
    if shape.num_layers % pp:
        raise ValueError(f"num_layers ({shape.num_layers}) is not divisible by the pipeline-parallel size {pp} "
                         "(uneven pipelines are not modelled)")
    per_stage = shape.num_layers // pp
    first, last = stage == 0, stage == pp - 1
    out = []
    for t in shape.tensors(tp, ep):
        if t.part == "layer":
            out.append(Tensor(t.name, t.shape, t.part, t.tp_split, t.expert, t.count // shape.num_layers * per_stage))
        elif t.part == "embedding" and first:
            out.append(t)
        elif t.part in ("final", "output") and last:
            out.append(t)
    if last and pp > 1 and not shape.untie_embeddings_and_output_weights:
        emb = shape.tensors(tp, ep)[0]  # tied embeddings: the last stage's copy, kept in sync by all-reduce
        out.append(Tensor("output_layer.weight (tied copy)", emb.shape, "output", True))
    return out


def _moment_bits(bits, avg_bits, block_size: int, scale_dtype: str) -> tuple[float, float, str]:
    """Bits per element of (exp_avg, exp_avg_sq) when packed, and a description."""
    scale = (32 if scale_dtype == "fp32" else 16) / block_size
    if bits is not None and avg_bits is not None:
        raise ValueError("give --stquant-bits or --stquant-avg-bits, not both (as the launch flags)")
    if bits is None:
        avg = DEFAULT_AVG_BITS if avg_bits is None else float(avg_bits)
        if avg <= 0:
            raise ValueError("--stquant-avg-bits must be positive")
        how = f"scheduled, avg_bits={avg:g}" + (" (the default config)" if avg_bits is None else "")
        return avg, avg, how + ": the budget, scale bits included, bounds the peak"
    pair = bits if isinstance(bits, (tuple, list)) else (bits, bits)
    if len(pair) != 2 or not all(2 <= int(b) <= 8 for b in pair):
        raise ValueError(f"--stquant-bits {bits!r}: N or M,V with widths in 2..8")
    sdesc = f"{scale_dtype} scale per {block_size}"
    return pair[0] + scale, pair[1] + scale, f"fixed {pair[0]},{pair[1]} bits + {sdesc}"


def estimate(
    *,
    num_parameters: int | str | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    ffn_hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    kv_channels: int | None = None,
    vocab_size: int | None = None,
    seq_length: int | None = None,
    max_position_embeddings: int | None = None,
    swiglu: bool = False,
    untie_embeddings_and_output_weights: bool = False,
    position_embedding_type: str = "learned_absolute",
    normalization: str = "LayerNorm",
    add_bias_linear: bool = True,
    add_qkv_bias: bool = False,
    qk_layernorm: bool = False,
    make_vocab_size_divisible_by: int = 128,
    num_experts: int | None = None,
    moe_ffn_hidden_size: int | None = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    data_parallel_size: int | None = None,
    world_size: int | None = None,
    expert_model_parallel_size: int = 1,
    precision: str = "bf16",
    grad_reduce_in_bf16: bool = False,
    accumulate_allreduce_grads_in_fp32: bool = False,
    stquant_bits: int | tuple[int, int] | None = None,
    stquant_avg_bits: float | None = None,
    stquant_block_size: int = 128,
    stquant_scale_dtype: str = "fp32",
    stquant_min_numel: int = 4096,
    stquant_exp_avg_sq_format: str = "packed",
) -> dict:
    """Bytes per GPU (the busiest rank) and checkpoint bytes, stock Megatron against STQuant.

    Give ``num_parameters`` or the shape (``num_layers``, ``hidden_size``, ``num_attention_heads``,
    ``vocab_size``, ...; Megatron-LM's argument names and defaults). See the module docstring for
    what is modelled. Returns a JSON-serialisable dict (bytes as ints)."""
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    if min(tp, pp, ep) < 1:
        raise ValueError("parallel sizes must be >= 1")
    if data_parallel_size is None:
        if world_size is None:
            data_parallel_size = 1
        else:
            if world_size % (tp * pp):
                raise ValueError(f"world size {world_size} is not divisible by TP x PP = {tp * pp}")
            data_parallel_size = world_size // (tp * pp)
    elif world_size is not None and world_size != data_parallel_size * tp * pp:
        raise ValueError(f"world size {world_size} != TP x PP x DP = {tp * pp * data_parallel_size}")
    dp = data_parallel_size
    if dp < 1:
        raise ValueError("data-parallel size must be >= 1")
    if (dp * tp) % (tp * ep):
        raise ValueError(f"expert-parallel size {ep} must divide the data-parallel size {dp} (expert TP = TP)")
    edp = dp // ep
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError("precision: bf16, fp16 or fp32")
    if stquant_exp_avg_sq_format not in ("packed", "factored"):
        raise ValueError("--stquant-exp-avg-sq-format: packed or factored")
    if stquant_scale_dtype not in ("fp32", "bf16"):
        raise ValueError("--stquant-scale-dtype: fp32 or bf16")
    if stquant_block_size < 8 or stquant_block_size & (stquant_block_size - 1):
        raise ValueError("--stquant-block-size must be a power of two")
    half = precision in ("bf16", "fp16")
    param_b = 2 if half else 4
    if precision == "bf16":
        grad_b, grad_why = (2, "bf16 (--grad-reduce-in-bf16)") if grad_reduce_in_bf16 else (
            4, "fp32 (Megatron-LM sets accumulate_allreduce_grads_in_fp32 with --bf16)")
    elif precision == "fp16":
        grad_b, grad_why = (4, "fp32 (--accumulate-allreduce-grads-in-fp32)") if accumulate_allreduce_grads_in_fp32 else (
            2, "fp16 (Megatron-LM's default with --fp16)")
    else:
        grad_b, grad_why = 4, "fp32"
    m_bits, v_bits, how = _moment_bits(stquant_bits, stquant_avg_bits, stquant_block_size, stquant_scale_dtype)
    factored = stquant_exp_avg_sq_format == "factored"
    notes = [f"gradient buffer: {grad_why}, held whole by every rank (the distributed optimizer reduce-scatters into it)",
             "not included: activations, CUDA context, allocator fragmentation, communication buffers"]
    block_bytes = stquant_block_size * max(m_bits, v_bits) / 8  # one block's codes + scale, at the widest
    shape = None
    if num_layers is not None or hidden_size is not None:
        shape = GPTShape(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                         vocab_size=vocab_size, ffn_hidden_size=ffn_hidden_size, num_query_groups=num_query_groups,
                         kv_channels=kv_channels, seq_length=seq_length, max_position_embeddings=max_position_embeddings,
                         swiglu=swiglu, untie_embeddings_and_output_weights=untie_embeddings_and_output_weights,
                         position_embedding_type=position_embedding_type, normalization=normalization,
                         add_bias_linear=add_bias_linear, add_qkv_bias=add_qkv_bias, qk_layernorm=qk_layernorm,
                         make_vocab_size_divisible_by=make_vocab_size_divisible_by, num_experts=num_experts,
                         moe_ffn_hidden_size=moe_ffn_hidden_size)
        if num_parameters is not None and parse_count(num_parameters) != shape.num_parameters():
            raise ValueError(f"--num-parameters {num_parameters} disagrees with the shape's {shape.num_parameters():,}")
        total_params = shape.num_parameters()
    elif num_parameters is not None:
        total_params = parse_count(num_parameters)
        if num_experts or ep > 1:
            raise ValueError("MoE (--num-experts, --expert-model-parallel-size) needs the model shape")
        notes.append(f"--num-parameters only: every GPU holds N / (TP x PP) = {total_params / (tp * pp):,.0f} "
                     "parameters (embeddings not placed on their stages), all in matrices: tensors under "
                     "--stquant-min-numel (fp32 moments) and factored statistics are ignored (for GPTs well "
                     "under 0.1% of the parameters); give the shape for the exact count per stage")
    else:
        raise ValueError("give --num-parameters or the model shape (--num-layers, --hidden-size, ...)")

    def stage_bytes(tensors: list[Tensor]) -> dict:
        n = sum(t.numel * t.count for t in tensors)
        dense = sum(t.numel * t.count for t in tensors if not t.expert)
        expert = n - dense
        sharded = dense / dp + expert / edp  # elements of this rank's optimizer shard
        escapes = sum(t.numel * t.count / (edp if t.expert else dp) for t in tensors if t.numel < stquant_min_numel)
        packed = sharded - escapes
        stats = 0
        v_packed = packed
        if factored:
            for t in tensors:
                if t.numel >= stquant_min_numel and len(t.shape) >= 2 and t.shape[0] >= 2 and t.numel // t.shape[0] >= 2:
                    stats += 4 * (t.shape[0] + t.numel // t.shape[0]) * t.count
                    v_packed -= t.numel * t.count / (edp if t.expert else dp)
        ours = packed * m_bits / 8 + v_packed * v_bits / 8 + stats + 8 * escapes
        pieces = sum(t.count for t in tensors)
        return {
            "params": n,
            "model_params": n * param_b,
            "grad_buffer": n * grad_b,
            "main_params": 4 * sharded if half else 0,
            "moments_stock": 8 * sharded,
            "moments_ours": ours,
            "escape_elements": escapes,
            "factored_stats": stats,
            # per-rank slack of the moments (documented in the README and the test): block padding of
            # every tensor's shard (one block per moment), step counters, alignment padding (64
            # elements per tensor, one bucket pad) and, in a DP run, where the escapes fall
            "moments_ours_slack": pieces * (2 * block_bytes + 4 + 64 * (m_bits + v_bits) / 8)
            + max(dp, 128) * (m_bits + v_bits) / 8 + escapes * (dp - 1) * max(0.0, 8 - (m_bits + v_bits) / 8),
        }

    stages = []
    if shape is not None:
        for s in range(pp):
            stages.append(stage_bytes(_stage_tensors(shape, tp, pp, ep, s)))
    else:
        per_gpu = total_params / (tp * pp)
        stages.append(stage_bytes([Tensor("all", (int(round(per_gpu)),), "layer", True)]))
        stages[0]["moments_ours"] = stages[0]["moments_stock"] / 8 * (m_bits + (0 if factored else v_bits)) / 8
    for st in stages:
        st["total_stock"] = st["model_params"] + st["grad_buffer"] + st["main_params"] + st["moments_stock"]
        st["total_ours"] = st["model_params"] + st["grad_buffer"] + st["main_params"] + st["moments_ours"]
    busiest = max(range(len(stages)), key=lambda i: stages[i]["total_stock"])
    busiest_ours = max(range(len(stages)), key=lambda i: stages[i]["total_ours"])
    gpu = {k: (round(v) if isinstance(v, float) else v) for k, v in stages[busiest].items()}

    # checkpoint: weights once + every (TP, PP) domain's optimizer buffers in fp32 (param, exp_avg, exp_avg_sq)
    if shape is not None:
        buf_elems = 0
        packed_moment_bytes = 0.0
        for s in range(pp):
            for t in _stage_tensors(shape, tp, pp, ep, s):
                holders = tp * (ep if t.expert else 1)  # every TP (and EP) rank's buffer holds its own copy
                e = t.numel * t.count * holders
                buf_elems += e
                if t.numel < stquant_min_numel:
                    packed_moment_bytes += 8 * e
                elif factored and len(t.shape) >= 2 and t.shape[0] >= 2 and t.numel // t.shape[0] >= 2:
                    packed_moment_bytes += e * m_bits / 8 + 4 * (t.shape[0] + t.numel // t.shape[0]) * t.count * holders
                else:
                    packed_moment_bytes += e * (m_bits + v_bits) / 8
    else:
        buf_elems = total_params
        packed_moment_bytes = total_params * (m_bits + (0 if factored else v_bits)) / 8
    padded_params = total_params if shape is None else shape.num_parameters(tp)
    weights = padded_params * param_b
    ckpt_stock = weights + 12 * buf_elems
    ckpt = {
        "weights": weights,
        "optimizer_elements": buf_elems,
        "stock": ckpt_stock,
        "ours_dense": ckpt_stock,
        "ours_packed": round(weights + 4 * buf_elems + packed_moment_bytes),
    }
    notes.append("checkpoints (torch_dist dp_reshardable, whole model; fully_reshardable and legacy torch measured within "
                 "1% of it): STQuant writes dense fp32 moments by default, the same bytes as stock and loadable by stock "
                 "Megatron; --stquant-checkpoint-format packed writes them as in memory in all three formats (loads with "
                 "stquant-megatron, or stock after `stquant-megatron checkpoint convert`; reshards as the format does)")
    if stquant_min_numel != 4096 and shape is None:
        notes.append("--stquant-min-numel is ignored without a model shape")
    if busiest_ours != busiest:
        notes.append(f"with STQuant the busiest stage is {busiest_ours} "
                     f"({stages[busiest_ours]['total_ours'] / GIB:.2f} GiB)")
    return {
        "inputs": {
            "num_parameters": total_params,
            "num_parameters_padded_for_tp": padded_params,
            "shape": None if shape is None else {k: getattr(shape, k) for k in shape.__dataclass_fields__}
            | {"ffn_hidden_size": shape.ffn, "padded_vocab_size": shape.padded_vocab(tp), "kv_channels": shape.kv,
               "num_query_groups": shape.query_groups},
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": dp,
            "expert_model_parallel_size": ep, "expert_data_parallel_size": edp, "world_size": tp * pp * dp,
            "precision": precision, "grad_bytes": grad_b,
            "stquant": {"bits": stquant_bits, "avg_bits": stquant_avg_bits, "block_size": stquant_block_size,
                        "scale_dtype": stquant_scale_dtype, "min_numel": stquant_min_numel,
                        "exp_avg_sq_format": stquant_exp_avg_sq_format, "exp_avg_bits_per_element": m_bits,
                        "exp_avg_sq_bits_per_element": 0.0 if factored else v_bits, "description": how},
        },
        "per_gpu": gpu | {"stage": busiest, "pipeline_stages": len(stages)},
        "stages": [{k: round(v) if isinstance(v, float) else v for k, v in st.items()} for st in stages],
        "checkpoint": ckpt,
        "notes": notes,
    }


def _gib(b: float) -> str:
    return f"{b / GIB:,.2f} GiB"


def format_table(est: dict) -> str:
    """The estimate as a readable table (per GPU, then the checkpoint)."""
    i, g, c = est["inputs"], est["per_gpu"], est["checkpoint"]
    s = i["stquant"]
    par = f"TP={i['tensor_model_parallel_size']} PP={i['pipeline_model_parallel_size']} DP={i['data_parallel_size']}"
    if i["expert_model_parallel_size"] > 1 or (i["shape"] or {}).get("num_experts"):
        par += f" EP={i['expert_model_parallel_size']} (expert DP={i['expert_data_parallel_size']})"
    dp = i["data_parallel_size"]
    n = g["params"]
    pb = g["model_params"] / max(1, n)
    lines = [
        f"model: {i['num_parameters']:,} parameters"
        + (f" ({i['num_parameters_padded_for_tp']:,} with the vocabulary padded for TP)"
           if i["num_parameters_padded_for_tp"] != i["num_parameters"] else "")
        + f", {i['precision']}, {par} ({i['world_size']} GPUs)",
        f"STQuant: {s['description']}; exp_avg {s['exp_avg_bits_per_element']:g} bits/element, exp_avg_sq "
        + ("factored (4 B per row and column)" if s["exp_avg_sq_format"] == "factored"
           else f"{s['exp_avg_sq_bits_per_element']:g} bits/element"),
        "",
        f"per GPU (busiest rank: pipeline stage {g['stage']} of {g['pipeline_stages']}, {n:,} parameters)",
        f"| {'component':<34} | {'stock':>12} | {'STQuant':>12} |",
        f"|{'-' * 36}|{'-' * 13}:|{'-' * 13}:|",
    ]
    rows = [
        (f"model params ({pb:g} B)", g["model_params"], g["model_params"]),
        (f"gradient buffer ({i['grad_bytes']} B)", g["grad_buffer"], g["grad_buffer"]),
        (f"fp32 main params (4 B / DP={dp})" if g["main_params"] else "fp32 main params (the model params)",
         g["main_params"], g["main_params"]),
        (f"Adam moments (stock 8 B / DP={dp})", g["moments_stock"], g["moments_ours"]),
        ("total", g["total_stock"], g["total_ours"]),
    ]
    for name, a, b in rows:
        lines.append(f"| {name:<34} | {_gib(a):>12} | {_gib(b):>12} |")
    saved = g["total_stock"] - g["total_ours"]
    lines.append(f"saved per GPU: {_gib(saved)} ({100 * saved / g['total_stock']:.1f}% of the total; moments "
                 f"{g['moments_stock'] / max(1, g['moments_ours']):.1f}x smaller)")
    bp = lambda b: b / i["num_parameters"]  # noqa: E731
    lines += [
        "",
        "checkpoint (torch_dist dp_reshardable, whole model)",
        f"| {'':<34} | {'bytes':>12} | {'B/param':>7} |",
        f"|{'-' * 36}|{'-' * 13}:|{'-' * 8}:|",
        f"| {'stock':<34} | {_gib(c['stock']):>12} | {bp(c['stock']):>7.2f} |",
        f"| {'STQuant, dense moments (default)':<34} | {_gib(c['ours_dense']):>12} | {bp(c['ours_dense']):>7.2f} |",
        f"| {'STQuant, packed moments':<34} | {_gib(c['ours_packed']):>12} | {bp(c['ours_packed']):>7.2f} |",
        "",
    ]
    lines += [f"- {note}" for note in est["notes"]]
    return "\n".join(lines)
