"""Packed optimizer moments in Megatron's ``torch_dist`` checkpoints (``dp_reshardable`` layout).

Stock Megatron writes every moment as dense fp32 (8 B/param for Adam), whatever the state costs in
memory. With ``--stquant-checkpoint-format packed`` (or ``STQUANT_CHECKPOINT_FORMAT``, or
``patch(..., checkpoint_format="packed")``) the distributed optimizer writes, per data-parallel
group of ranks (one TPxPP(xEP) slice):

- the main fp32 params as Megatron does (its own bucket ``ShardedTensor``\\ s, unchanged);
- ``<prefix>.stquant_packed``: one uint8 ``ShardedTensor``; each data-parallel rank writes its own
  contiguous chunk: for every parameter shard it holds, each moment as it is in memory (codes and
  block scales, factored row/column statistics, or fp32 for the small "escape" tensors);
- ``<prefix>.stquant_layout``: a small object (written once per group) listing every rank's entries:
  parameter name, element range, moment, format, the tensors' dtypes/shapes/byte ranges and a CRC32.

The checkpoint's content metadata says ``distrib_optim_sharding_type = PACKED_DP_RESHARDABLE``: a stock
Megatron run pointed at it stops at load with that string (which says what to do) in its error,
never loading garbage; a patched run recognises it. Dense checkpoints (stock or ours) load as before.

Loading is two-phase, inside ``dist_checkpointing.load`` (wrapped): the layout is read first, then
each rank requests only the byte ranges of the entries that overlap its own parameter shards.

- Same data-parallel layout (resume): every shard finds one entry with its exact element range and
  takes it as it is: codes, scales and statistics bit-exact (re-coded only if this run's widths or
  block size differ, as ``STQuantAdamW.load_state_dict`` does).
- Another data-parallel size: a shard covered by several old entries is decoded entry by entry into
  its dense fp32 values (one shard at a time, never the whole model) and quantized at this run's width:
  one extra rounding, ``|x' - x| <= half a level of x's new block`` (nearest) or one level (stochastic).
- Tensor/pipeline/expert parallel sizes must be the saving run's (as for stock ``dp_reshardable``);
  for those, save dense ``fully_reshardable`` checkpoints.

Everything is validated (sizes, CRC32, ``checkpoint.saved_state``, finiteness) before the optimizer changes:
a damaged checkpoint raises ``ValueError`` naming the parameter and moment, and the optimizer is left
as it was.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from typing import Any

import torch

from .. import checkpoint
from ..config import MOMENTS
from ..optim import STQuantAdamW
from ..state import QUANTIZED_STATES, FactoredState

PACKED_DP_RESHARDABLE = (
    "dp_reshardable+stquant_packed (optimizer moments packed by stquant-megatron: load this checkpoint with "
    "stquant-megatron installed, e.g. --stquant; to continue with stock Megatron, load it once with stquant-megatron "
    "and save it with --stquant-checkpoint-format dense)"
)
"""``distrib_optim_sharding_type`` of a packed checkpoint (a stock run's error message quotes it)."""

FORMATS = ("dense", "packed")
LAYOUT_VERSION = 1
_HEADER = 16  # bytes at the start of every rank's chunk: never empty, and a marker of the layout version


def is_packed_type(sharding_type: Any) -> bool:
    return isinstance(sharding_type, str) and sharding_type.startswith("dp_reshardable+stquant_packed")


def check_format(value: Any, where: str = "checkpoint_format") -> str:
    if value not in FORMATS:
        raise ValueError(f"{where}={value!r} is invalid: choose 'dense' (Megatron's own fp32 moments, loadable by stock "
                         "Megatron) or 'packed' (the moments as they are in memory)")  # fmt: skip
    return value


class PackedRequest(dict):
    """Placeholder in a loading sharded state dict: ``{"layout": ShardedObject}``; the wrapped
    ``dist_checkpointing.load`` reads the layout first and adds ``"pieces"`` (the byte ranges this rank
    needs, as uint8 ``ShardedTensor``\\ s). A dict, so that Megatron's key prefixing reaches the layout."""


# ----------------------------------------------------------------------------------- save side
@contextlib.contextmanager
def params_only(distopt: Any):
    """While active, the checkpoint seam ``_get_main_param_and_optimizer_states`` returns the main param
    only: Megatron's bucket tensors then hold params, and nothing dense is built for the moments."""
    distopt._stquant_params_only = True
    try:
        yield
    finally:
        distopt._stquant_params_only = False


def _local_shards(distopt: Any, where: bool = False):
    """(model_param, main param, global name, start, numel) of this rank's shards, in bucket order; with
    ``where``, also their place in Megatron's bucket space (the key of the bucket's dense tensors in a
    dense dp_reshardable checkpoint, the shard's offset in it and the bucket's unpadded size): what an
    offline converter to the dense format needs."""
    inner = distopt.optimizer
    dp_rank, dp_size = distopt.data_parallel_group.rank(), distopt.data_parallel_group.size()
    for gbuf_idx, gbuf_range_maps in enumerate(distopt.gbuf_ranges):
        for dtype, gbuf_range_map_for_all_buckets in gbuf_range_maps.items():
            for bucket_idx, gbuf_range_map in enumerate(gbuf_range_map_for_all_buckets):
                for model_param, range_map in gbuf_range_map["param_map"].items():
                    gi, go = distopt.model_param_group_index_map[model_param]
                    main = inner.param_groups[gi]["params"][go]
                    r = range_map["param"]
                    out = (model_param, main, inner.param_name(main), int(r.start), int(r.size))
                    if where:
                        bucket = distopt.buffers[gbuf_idx].buckets[bucket_idx]
                        local = bucket.grad_data.numel() // dp_size
                        out += ({"bucket_key": f"{_prefix(distopt)}.gbuf_idx_{gbuf_idx}.dtype_{dtype}.bucket_idx_{bucket_idx}",
                                 "bucket_offset": dp_rank * local + int(range_map["gbuf_local"].start),
                                 "bucket_numel": int(bucket.numel_unpadded)},)  # fmt: skip
                    yield out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def _moment_record(value: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(plain values, tensors) of one moment, as ``to_dict()`` splits them (dense: ``{"dense": t}``)."""
    d = value.to_dict() if isinstance(value, QUANTIZED_STATES) else {"dense": value.detach().float().reshape(-1)}
    return ({k: v for k, v in d.items() if not torch.is_tensor(v)}, {k: v for k, v in d.items() if torch.is_tensor(v)})


def _prefix(distopt: Any) -> str:
    return f"optimizer.distributed.dp_group_idx_{distopt.data_parallel_group_idx}"


def save_entries(distopt: Any) -> dict[str, Any]:
    """This rank's packed moments as Megatron sharded objects (collective over the data-parallel group:
    every rank's chunk length and entries are gathered so that each writes at its own offset)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    inner = distopt.optimizer
    group = distopt.data_parallel_group
    dp_rank, dp_size = group.rank(), group.size()
    parts: list[torch.Tensor] = [torch.zeros(_HEADER, dtype=torch.uint8)]
    parts[0][:8] = torch.tensor([LAYOUT_VERSION], dtype=torch.int64).view(torch.uint8)
    offset = _HEADER
    entries = []
    for _, main, name, start, numel, place in _local_shards(distopt, where=True):
        inner.init_state(main)
        for key in MOMENTS:
            plain, tensors = _moment_record(inner.state[main][key])
            spec, crc = {}, 0
            for tname, t in tensors.items():
                b = _as_bytes(t)
                spec[tname] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                               "offset": offset, "nbytes": b.numel()}  # fmt: skip
                crc = zlib.crc32(b.numpy(), crc)
                parts.append(b)
                offset += b.numel()
            entries.append({"name": name, "start": start, "numel": numel, "moment": key, "plain": plain,
                            "tensors": spec, "crc32": crc, **place})  # fmt: skip
    chunk = torch.cat(parts)
    chunk[8:16] = torch.tensor([chunk.numel()], dtype=torch.int64).view(torch.uint8)
    gathered: list[Any] = [None] * dp_size
    torch.distributed.all_gather_object(gathered, {"nbytes": chunk.numel(), "entries": entries}, group=group)
    offsets = [0]
    for g in gathered:
        offsets.append(offsets[-1] + g["nbytes"])
    layout = {"version": LAYOUT_VERSION, "dp_size": dp_size, "total": offsets[-1],
              "ranks": [{"offset": offsets[r], **gathered[r]} for r in range(dp_size)]}  # fmt: skip
    inst = getattr(distopt, "distributed_optimizer_instance_id", 0)
    prefix = _prefix(distopt)
    return {
        "layout": ShardedObject(f"{prefix}.stquant_layout", layout, (1,), (0,), replica_id=(inst, 0, dp_rank)),
        "packed": ShardedTensor(
            key=f"{prefix}.stquant_packed", data=chunk, dtype=torch.uint8, local_shape=(chunk.numel(),),
            global_shape=(offsets[-1],), global_offset=(offsets[dp_rank],), axis_fragmentations=None,
            replica_id=(inst, 0, 0), prepend_axis_num=0, allow_shape_mismatch=False, flattened_range=None,
        ),
    }  # fmt: skip


def load_request(distopt: Any) -> PackedRequest:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    inst = getattr(distopt, "distributed_optimizer_instance_id", 0)
    req = PackedRequest()
    req["layout"] = ShardedObject(f"{_prefix(distopt)}.stquant_layout", None, (1,), (0,),
                                  replica_id=(inst, 0, distopt.data_parallel_group.rank()))  # fmt: skip
    req.owner = distopt
    return req


# ----------------------------------------------------------------------------------- load side
def _find_requests(tree: Any, out: list) -> list:
    if isinstance(tree, PackedRequest):
        out.append(tree)
    elif isinstance(tree, dict):
        for v in tree.values():
            _find_requests(v, out)
    elif isinstance(tree, list):
        for v in tree:
            _find_requests(v, out)
    return out


def resolve_requests(sharded_state_dict: Any, checkpoint_dir: str, load) -> None:
    """Before Megatron's load: read the layouts of every ``PackedRequest`` and add the byte ranges
    that overlap this rank's shards (collective: every rank calls ``load`` once more, for the layouts)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    requests = _find_requests(sharded_state_dict, [])
    if not requests:
        return
    small = {f"layout_{i}": ShardedObject(r["layout"].key, None, (1,), (0,), replica_id=r["layout"].replica_id)
             for i, r in enumerate(requests)}  # fmt: skip
    loaded = load(small, checkpoint_dir)
    for i, req in enumerate(requests):
        layout = loaded[f"layout_{i}"]
        _check_layout(layout, req["layout"].key)
        want = {(name, start, numel) for _, _, name, start, numel in _local_shards(req.owner)}
        names = {n for n, _, _ in want}
        key = req["layout"].key[: -len("stquant_layout")] + "stquant_packed"
        pieces = {}
        for r, rank in enumerate(layout["ranks"]):
            for j, e in enumerate(rank["entries"]):
                if e["name"] not in names:
                    continue
                lo, hi = span(e)
                mine = [(s, n) for name, s, n in want if name == e["name"]]
                if not any(s < e["start"] + e["numel"] and e["start"] < s + n for s, n in mine) and not (
                    e["plain"].get("factored") and mine
                ):  # factored statistics describe the whole matrix: any entry of it serves
                    continue
                pieces[f"{r}.{j}"] = ShardedTensor(
                    key=key, data=torch.empty(hi - lo, dtype=torch.uint8), dtype=torch.uint8, local_shape=(hi - lo,),
                    global_shape=(layout["total"],), global_offset=(rank["offset"] + lo,), axis_fragmentations=None,
                    replica_id=req["layout"].replica_id, prepend_axis_num=0, allow_shape_mismatch=False,
                    flattened_range=None,
                )  # fmt: skip
        req["pieces"] = pieces


def _check_layout(layout: Any, key: str) -> None:
    ok = isinstance(layout, dict) and layout.get("version") == LAYOUT_VERSION and isinstance(layout.get("ranks"), list)
    if not ok:
        got = layout.get("version") if isinstance(layout, dict) else type(layout).__name__
        raise ValueError(f"{key}: not a stquant packed-checkpoint layout of version {LAYOUT_VERSION} (got {got!r}); "
                         "load it with the stquant-megatron version that wrote it")  # fmt: skip


def span(e: dict) -> tuple[int, int]:
    """The byte range ``[lo, hi)`` of a layout entry in its rank's chunk."""
    return (min(t["offset"] for t in e["tensors"].values()), max(t["offset"] + t["nbytes"] for t in e["tensors"].values()))


def factored_shard(d: dict, start: int, numel: int) -> dict:
    """A factored entry's ``to_dict`` (the whole matrix's statistics, from any shard of it) as the shard of
    elements ``start .. start + numel``."""
    return {**{k: v for k, v in d.items() if k not in ("offset", "numel")}, "offset": start, "numel": numel}


def _decode_entry(e: dict, piece: torch.Tensor, where: str) -> Any:
    """The moment of one layout entry from its bytes: a dict for ``checkpoint.saved_state`` or a dense tensor."""
    lo, hi = span(e)
    if piece.dtype != torch.uint8 or piece.numel() != hi - lo:
        raise ValueError(f"{where}: {piece.numel()} bytes loaded, the layout lists more; the checkpoint is truncated")
    crc, out = 0, dict(e["plain"])
    for tname, t in e["tensors"].items():
        b = piece[t["offset"] - lo : t["offset"] - lo + t["nbytes"]]
        crc = zlib.crc32(b.numpy(), crc)
        dtype = getattr(torch, t["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}: tensor {tname!r} has unknown dtype {t['dtype']!r}")
        n = 1
        for s in t["shape"]:
            n *= int(s)
        if n * torch.empty((), dtype=dtype).element_size() != b.numel():
            raise ValueError(f"{where}: tensor {tname!r} of shape {t['shape']} ({t['dtype']}) does not fill its "
                             f"{b.numel()} bytes: the checkpoint is damaged")  # fmt: skip
        out[tname] = b.clone().view(dtype).reshape(t["shape"])
    if crc != e["crc32"]:
        raise ValueError(f"{where}: CRC32 mismatch ({crc:#010x}, the layout says {e['crc32']:#010x}): the checkpoint "
                         "is damaged; restore it from a copy")  # fmt: skip
    return out.get("dense") if "dense" in out else out


def validate(loaded: Any) -> dict[str, Any]:
    """Every loaded entry's sizes and CRC32 (before the optimizer changes); raises ValueError naming it.
    Returns the decoded entries by piece id, for ``prepare``."""
    if not isinstance(loaded, dict) or "pieces" not in loaded:
        raise ValueError("the packed optimizer moments were not loaded: load packed checkpoints through "
                         "megatron.core.dist_checkpointing.load with stquant_megatron.megatron patched")  # fmt: skip
    layout = loaded["layout"]
    _check_layout(layout, "stquant_layout")
    out = {}
    for piece_id, piece in loaded["pieces"].items():
        r, j = (int(x) for x in piece_id.split("."))
        e = layout["ranks"][r]["entries"][j]
        out[piece_id] = _decode_entry(e, piece, f"packed checkpoint {e['moment']} of {e['name']!r} (elements "
                                                f"{e['start']}..{e['start'] + e['numel']}, saved by data-parallel rank {r})")  # fmt: skip
    return out


def prepare(distopt: Any, loaded: Any, decoded: dict[str, Any]) -> list[tuple]:
    """Every moment of this rank's shards in this optimizer's format, from ``validate``'s decoded entries;
    nothing changes yet. Returns ``(main param, moment, state or ("stage", dense))`` to ``commit``."""
    layout = loaded["layout"]
    inner: STQuantAdamW = distopt.optimizer
    by_name: dict[tuple[str, str], list] = {}
    for piece_id, value in decoded.items():
        r, j = (int(x) for x in piece_id.split("."))
        e = layout["ranks"][r]["entries"][j]
        by_name.setdefault((e["name"], e["moment"]), []).append((e, value))
    out, recoded = [], []
    for _, main, name, start, numel in _local_shards(distopt):
        for key in MOMENTS:
            where = f"packed checkpoint {key} of {name!r} (elements {start}..{start + numel})"
            found = by_name.get((name, key), [])
            exact = [(e, p) for e, p in found if e["start"] == start and e["numel"] == numel]
            factored = [(e, p) for e, p in found if e["plain"].get("factored")]
            if exact:
                value = exact[0][1]
            elif factored:  # the whole matrix's statistics, from any shard of it
                value = factored_shard(factored[0][1], start, numel)
                if not isinstance(inner.state[main].get(key), FactoredState):
                    value = checkpoint_state(value, where).dequantize(device="cpu")  # this run packs it: the estimate
            else:
                value = torch.empty(numel, dtype=torch.float32)
                covered = torch.zeros(numel, dtype=torch.bool)
                for e, v in found:
                    dense = _dense(v, where)
                    a, b = max(start, e["start"]), min(start + numel, e["start"] + e["numel"])
                    if a < b:
                        value[a - start : b - start] = dense[a - e["start"] : b - e["start"]]
                        covered[a - start : b - start] = True
                if not bool(covered.all()):
                    raise ValueError(f"{where}: the checkpoint covers {int(covered.sum())} of its {numel} elements; "
                                     "it was saved for another model or tensor/pipeline-parallel layout (packed "
                                     "checkpoints reshard across data-parallel sizes only)")  # fmt: skip
            st = inner.state[main].get(key)
            if isinstance(st, FactoredState) and name in inner._factor_slots and not (
                isinstance(value, dict) and value.get("factored")
            ):  # a factored shard of this run from packed or dense values: statistics all-reduced over the shards
                value = _dense(value, where)
                checkpoint._check_dense(name, key, value, main)
                out.append((main, key, ("stage", value)))
                continue
            out.append((main, key, checkpoint._load_moment(inner, main, key, value, None, recoded)))
    return out


def checkpoint_state(d: dict, where: str):
    return checkpoint.saved_state(d, torch.device("cpu"), where)


def _dense(value: Any, where: str) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.reshape(-1).float()
    return checkpoint_state(value, where).dequantize(device="cpu").reshape(-1)


@torch.no_grad()
def commit(distopt: Any, prepared: list[tuple]) -> None:
    """Put what ``prepare`` built into the optimizer (after Megatron has set the params)."""
    inner: STQuantAdamW = distopt.optimizer
    for main, key, value in prepared:
        if isinstance(value, tuple):
            inner.stage_factored_load(main, value[1])
        else:
            inner.state[main][key] = value
    inner._note_bytes()


def default_format() -> str:
    return check_format(os.environ.get("STQUANT_CHECKPOINT_FORMAT", "dense"), "STQUANT_CHECKPOINT_FORMAT")
