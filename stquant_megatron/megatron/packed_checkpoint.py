"""Packed optimizer moments in Megatron's checkpoints: ``torch_dist`` ``dp_reshardable`` (below),
``fully_reshardable`` (model space: section "fully_reshardable") and legacy ``torch`` (section "legacy").

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
  for those, save ``fully_reshardable`` checkpoints (packed or dense).

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
from . import model_space

_WAY_BACK = ("load it with stquant-megatron installed (e.g. --stquant), or convert it to stock Megatron's dense form "
             "offline: stquant-megatron checkpoint convert SRC DST --to dense")  # fmt: skip
PACKED_DP_RESHARDABLE = f"dp_reshardable+stquant_packed (optimizer moments packed by stquant-megatron: {_WAY_BACK})"
"""``distrib_optim_sharding_type`` of a packed checkpoint (a stock run's error message quotes it)."""
PACKED_FULLY_RESHARDABLE = f"fully_reshardable+stquant_packed (optimizer moments packed by stquant-megatron: {_WAY_BACK})"
"""``distrib_optim_sharding_type`` of a packed ``--dist-ckpt-optim-fully-reshardable`` checkpoint."""
PACKED_DP_ZERO = f"dp_zero+stquant_packed (optimizer moments packed by stquant-megatron: {_WAY_BACK})"
"""``format`` of the ``"stquant"`` entry of a packed legacy ``torch`` checkpoint's ``distrib_optim.pt``."""

FORMATS = ("dense", "packed")
LAYOUT_VERSION = 1
_HEADER = 16  # bytes at the start of every rank's chunk: never empty, and a marker of the layout version


def packed_kind(sharding_type: Any) -> str | None:
    """Megatron's sharding type under a packed one (``"dp_reshardable"`` or ``"fully_reshardable"``), else None."""
    for kind in ("dp_reshardable", "fully_reshardable"):
        if isinstance(sharding_type, str) and sharding_type.startswith(f"{kind}+stquant_packed"):
            return kind
    return None


def is_packed_type(sharding_type: Any) -> bool:
    return packed_kind(sharding_type) is not None


def packed_type(kind: str) -> str:
    """The packed sharding type over Megatron's ``kind``."""
    return {"dp_reshardable": PACKED_DP_RESHARDABLE, "fully_reshardable": PACKED_FULLY_RESHARDABLE}[kind]


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


def _buckets(distopt: Any):
    """(buffer index, dtype, bucket index, bucket, its param map, its start in the buffer's unpadded world
    tensors (legacy dp_zero)) of every bucket, in Megatron's order."""
    for gbuf_idx, gbuf_range_maps in enumerate(distopt.gbuf_ranges):
        for dtype, maps in gbuf_range_maps.items():
            start = 0
            for bucket_idx, m in enumerate(maps):
                bucket = distopt.buffers[gbuf_idx].buckets[bucket_idx]
                yield gbuf_idx, dtype, bucket_idx, bucket, m["param_map"], start
                start += int(bucket.numel_unpadded)


def main_param(distopt: Any, model_param: Any) -> torch.Tensor:
    """The inner optimizer's (fp32 main) parameter shard of ``model_param``."""
    gi, go = distopt.model_param_group_index_map[model_param]
    return distopt.optimizer.param_groups[gi]["params"][go]


def _local_shards(distopt: Any, where: bool = False):
    """(model_param, main param, global name, start, numel) of this rank's shards, in bucket order; with
    ``where``, also their place in Megatron's dense forms (dp_reshardable: the key of the bucket's dense
    tensors, the shard's offset in it and the bucket's unpadded size; legacy dp_zero: the buffer and the
    shard's offset in its unpadded world tensors): what an offline converter to the dense format needs."""
    inner = distopt.optimizer
    dp_rank, dp_size = distopt.data_parallel_group.rank(), distopt.data_parallel_group.size()
    for gbuf_idx, dtype, bucket_idx, bucket, param_map, world_start in _buckets(distopt):
        for model_param, range_map in param_map.items():
            main = main_param(distopt, model_param)
            r = range_map["param"]
            out = (model_param, main, inner.param_name(main), int(r.start), int(r.size))
            if where:
                local = bucket.grad_data.numel() // dp_size
                offset = dp_rank * local + int(range_map["gbuf_local"].start)
                out += ({"bucket_key": f"{_prefix(distopt)}.gbuf_idx_{gbuf_idx}.dtype_{dtype}.bucket_idx_{bucket_idx}",
                         "bucket_offset": offset, "bucket_numel": int(bucket.numel_unpadded),
                         "buffer": gbuf_idx, "world_offset": world_start + offset},)  # fmt: skip
            yield out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def _moment_record(value: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(plain values, tensors) of one moment, as ``to_dict()`` splits them (dense: ``{"dense": t}``)."""
    d = value.to_dict() if isinstance(value, QUANTIZED_STATES) else {"dense": value.detach().float().reshape(-1)}
    return ({k: v for k, v in d.items() if not torch.is_tensor(v)}, {k: v for k, v in d.items() if torch.is_tensor(v)})


def _prefix(distopt: Any) -> str:
    return f"optimizer.distributed.dp_group_idx_{distopt.data_parallel_group_idx}"


def _pack_chunk(distopt: Any, names: set[str] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """(this rank's chunk: a header and every moment of its shards (of parameters ``names``: all by default)
    as in memory, the chunk's entries)."""
    inner = distopt.optimizer
    parts: list[torch.Tensor] = [torch.zeros(_HEADER, dtype=torch.uint8)]
    parts[0][:8] = torch.tensor([LAYOUT_VERSION], dtype=torch.int64).view(torch.uint8)
    offset = _HEADER
    entries = []
    for _, main, name, start, numel, place in _local_shards(distopt, where=True):
        if names is not None and name not in names:
            continue
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
    return chunk, entries


def _layout(gathered: list[dict[str, Any]]) -> dict[str, Any]:
    """The layout of every rank's chunk (``{"nbytes", "entries"}`` per rank, in rank order)."""
    offsets = [0]
    for g in gathered:
        offsets.append(offsets[-1] + g["nbytes"])
    return {"version": LAYOUT_VERSION, "dp_size": len(gathered), "total": offsets[-1],
            "ranks": [{"offset": offsets[r], "nbytes": g["nbytes"], "entries": g["entries"]}
                      for r, g in enumerate(gathered)]}  # fmt: skip


def save_entries(distopt: Any) -> dict[str, Any]:
    """This rank's packed moments as Megatron sharded objects (collective over the data-parallel group:
    every rank's chunk length and entries are gathered so that each writes at its own offset)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    group = distopt.data_parallel_group
    dp_rank, dp_size = group.rank(), group.size()
    chunk, entries = _pack_chunk(distopt)
    gathered: list[Any] = [None] * dp_size
    torch.distributed.all_gather_object(gathered, {"nbytes": chunk.numel(), "entries": entries}, group=group)
    layout = _layout(gathered)
    offsets = [r["offset"] for r in layout["ranks"]] + [layout["total"]]
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


# ----------------------------------------------------------------------------------- fully_reshardable (model space)
# Megatron's fully_reshardable format stores each parameter's state in model space (the model's own
# ShardedTensor key, global shape and tensor-parallel offsets), so it loads at other TP/PP/EP/DP sizes.
# Packed, every rank of the world writes its chunk (codes and scales as in memory) into one uint8 tensor;
# the layout adds, per parameter, its *placement*: which ShardedTensor(s) Megatron saves it as (key, global
# shape and offset) and which of its local elements fill each (a strided view of the flat local tensor, so
# that factories such as the SwiGLU fc1 split are exact). A loading rank maps its own shards and the saved
# entries to global element indices per key; equal placement and range: the entry as it is (bit-exact).
def placements(distopt: Any, model_sharded_state_dict: Any) -> dict[str, dict[str, Any]]:
    """The placement of every parameter this rank holds a shard of, by its global name (``"main"``: whether
    this rank's copy is the one Megatron saves)."""
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    by_param = {id(sh.data): sh for sh in model_space.sharded_leaves(tensors)}
    out = {}
    for model_param, _, name, _, _ in _local_shards(distopt):
        sh = by_param.get(id(model_param))
        if sh is None:
            raise ValueError(f"{name}: not in the model's sharded state dict, which a packed fully_reshardable "
                             "checkpoint places the moments by (keep_vars=True?)")  # fmt: skip
        out[name] = {**model_space.placement(sh, tuple(model_param.shape)), "main": model_space.main_replica(sh.replica_id)}
    return out


def _world_layout(chunk: torch.Tensor, entries: list, places: dict) -> dict[str, Any]:
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, {"nbytes": chunk.numel(), "entries": entries, "placements": places})
    layout = _layout(gathered)
    layout["kind"] = "fully_reshardable"
    for rank, g in zip(layout["ranks"], gathered):
        rank["placements"] = g["placements"]
    return layout


def _model_space_prefix(distopt: Any) -> str:
    return model_space.prefix(any(not getattr(p, "allreduce", True) for p, *_ in _local_shards(distopt)))


def save_entries_model_space(distopt: Any, model_sharded_state_dict: Any) -> dict[str, Any]:
    """This rank's packed moments and the world's layout as Megatron sharded objects (collective over the
    world: every rank's chunk length, entries and placements are gathered)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    if getattr(distopt, "distributed_optimizer_instance_id", 0):
        raise ValueError("packed fully_reshardable checkpoints with several distributed-optimizer instances are not "
                         "supported; save with --stquant-checkpoint-format dense")  # fmt: skip
    places = placements(distopt, model_sharded_state_dict)
    chunk, entries = _pack_chunk(distopt, {name for name, p in places.items() if p["main"]})
    layout = _world_layout(chunk, entries, {name: places[name] for name in {e["name"] for e in entries}})
    rank = torch.distributed.get_rank()
    return {
        "layout": ShardedObject(f"{_model_space_prefix(distopt)}.stquant_layout", layout, (1,), (0,), replica_id=rank),
        "packed": ShardedTensor(
            key=f"{_model_space_prefix(distopt)}.stquant_packed", data=chunk, dtype=torch.uint8, local_shape=(chunk.numel(),),
            global_shape=(layout["total"],), global_offset=(layout["ranks"][rank]["offset"],), axis_fragmentations=None,
            replica_id=0, prepend_axis_num=0, allow_shape_mismatch=False, flattened_range=None,
        ),
    }  # fmt: skip


def load_request_model_space(distopt: Any, model_sharded_state_dict: Any) -> PackedRequest:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    distopt._stquant_placements = placements(distopt, model_sharded_state_dict)
    req = PackedRequest()
    req["layout"] = ShardedObject(f"{_model_space_prefix(distopt)}.stquant_layout", None, (1,), (0,),
                                  replica_id=torch.distributed.get_rank())  # fmt: skip
    req.owner = distopt
    return req


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
        key = req["layout"].key[: -len("stquant_layout")] + "stquant_packed"
        pieces = {}
        in_model_space = layout.get("kind") == "fully_reshardable"
        wanted = model_space.boxes(req.owner._stquant_placements.values()) if in_model_space else _wanted(req.owner)
        for r, j, lo, hi in _needed(layout, wanted):
            pieces[f"{r}.{j}"] = ShardedTensor(
                key=key, data=torch.empty(hi - lo, dtype=torch.uint8), dtype=torch.uint8, local_shape=(hi - lo,),
                global_shape=(layout["total"],), global_offset=(layout["ranks"][r]["offset"] + lo,),
                axis_fragmentations=None, replica_id=req["layout"].replica_id, prepend_axis_num=0,
                allow_shape_mismatch=False, flattened_range=None,
            )  # fmt: skip
        req["pieces"] = pieces


def _wanted(distopt: Any) -> list[tuple[str, int, int]]:
    """(name, start, numel) of this rank's parameter shards."""
    return [(name, start, numel) for _, _, name, start, numel in _local_shards(distopt)]


def _needed(layout: dict[str, Any], want: Any) -> list[tuple[int, int, int, int]]:
    """(saving rank, entry index, byte range in its chunk) of the layout's entries that overlap the shards
    ``want`` (bucket space: ``_wanted``; model space: ``model_space.boxes`` of this rank's placements); a factored entry
    serves any shard of its matrix (its statistics describe the whole matrix)."""
    out = []
    if layout.get("kind") == "fully_reshardable":
        for r, rank in enumerate(layout["ranks"]):
            for j, e in enumerate(rank["entries"]):
                if model_space.meets(rank["placements"][e["name"]], want):
                    out.append((r, j, *span(e)))
        return out
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, s, n in want:
        by_name.setdefault(name, []).append((s, n))
    for r, rank in enumerate(layout["ranks"]):
        for j, e in enumerate(rank["entries"]):
            mine = by_name.get(e["name"])
            if not mine:
                continue
            if e["plain"].get("factored") or any(s < e["start"] + e["numel"] and e["start"] < s + n for s, n in mine):
                out.append((r, j, *span(e)))
    return out


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


def entry_where(e: dict, rank: int) -> str:
    """How errors name a layout entry saved by data-parallel rank ``rank``."""
    return (f"packed checkpoint {e['moment']} of {e['name']!r} (elements {e['start']}..{e['start'] + e['numel']}, "
            f"saved by data-parallel rank {rank})")


def legacy_payload(st: Any, where: str) -> tuple[dict[str, Any], torch.Tensor]:
    """(layout, packed bytes) of a packed legacy file's ``"stquant"`` entry, checked."""
    layout, data = st.get("layout"), st.get("packed")
    _check_layout(layout, f"{where} stquant layout")
    if not torch.is_tensor(data) or data.dtype != torch.uint8:
        raise ValueError(f"{where}: the packed moments are not a uint8 tensor: the checkpoint is damaged")
    return layout, data


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
        out[piece_id] = _decode_entry(e, piece, entry_where(e, r))
    return out


def prepare(distopt: Any, loaded: Any, decoded: dict[str, Any]) -> list[tuple]:
    """Every moment of this rank's shards in this optimizer's format, from ``validate``'s decoded entries;
    nothing changes yet. Returns ``(main param, moment, state or ("stage", dense))`` to ``commit``.
    An entry saved for the same shard (same parameter, element range and, in model space, placement) is
    taken as it is; otherwise the shard's dense values are assembled from the entries that cover it."""
    layout = loaded["layout"]
    inner: STQuantAdamW = distopt.optimizer
    in_model_space = layout.get("kind") == "fully_reshardable"
    by_moment: dict[str, list] = {key: [] for key in MOMENTS}
    for piece_id, value in decoded.items():
        r, j = (int(x) for x in piece_id.split("."))
        e = layout["ranks"][r]["entries"][j]
        place = layout["ranks"][r]["placements"][e["name"]] if in_model_space else None
        by_moment.setdefault(e["moment"], []).append((e, place, value))
    out, recoded = [], []
    for _, main, name, start, numel in _local_shards(distopt):
        place = distopt._stquant_placements[name] if in_model_space else None
        boxes = model_space.boxes([place]) if in_model_space else None
        for key in MOMENTS:
            where = f"packed checkpoint {key} of {name!r} (elements {start}..{start + numel})"
            found = [(e, pl, v) for e, pl, v in by_moment[key]
                     if (model_space.meets(pl, boxes) if in_model_space else e["name"] == name)]  # fmt: skip
            same = [(e, v) for e, pl, v in found if model_space.same_place(pl, place)]  # the same parameter shard's matrix
            exact = [v for e, v in same if e["start"] == start and e["numel"] == numel]
            factored = [v for e, v in same if e["plain"].get("factored")]
            if exact:
                value = exact[0]
            elif factored:  # the whole matrix's statistics, from any shard of it
                value = factored_shard(factored[0], start, numel)
                if not isinstance(inner.state[main].get(key), FactoredState):
                    value = checkpoint_state(value, where).dequantize(device="cpu")  # this run packs it: the estimate
            else:
                value, covered = (_assemble_model_space(found, place, start, numel, where) if in_model_space
                                  else _assemble(found, start, numel, where))  # fmt: skip
                if not bool(covered.all()):
                    hint = ("" if in_model_space else " or tensor/pipeline-parallel layout (packed dp_reshardable "
                            "checkpoints reshard across data-parallel sizes only; save fully_reshardable for those)")
                    raise ValueError(f"{where}: the checkpoint covers {int(covered.sum())} of its {numel} elements; "
                                     f"it was saved for another model{hint}")  # fmt: skip
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


def _assemble(found: list, start: int, numel: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense values of the elements ``start .. start + numel`` of a parameter, which of them the bucket-space
    entries ``found`` cover)."""
    value = torch.empty(numel, dtype=torch.float32)
    covered = torch.zeros(numel, dtype=torch.bool)
    for e, _, v in found:
        a, b = max(start, e["start"]), min(start + numel, e["start"] + e["numel"])
        if a < b:
            dense = _dense(v, where)
            value[a - start : b - start] = dense[a - e["start"] : b - e["start"]]
            covered[a - start : b - start] = True
    return value, covered


def _assemble_model_space(found: list, place: dict, start: int, numel: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in model space: each piece of this shard's placement and of the saved entries' placements
    mapped to global element indices of its key (one parameter at a time: the buffer spans this shard's
    indices)."""
    value = torch.empty(numel, dtype=torch.float32)
    covered = torch.zeros(numel, dtype=torch.bool)
    dense: dict[int, torch.Tensor] = {}
    for piece in place["pieces"]:
        pos, glob = model_space.piece_index(piece, place["numel"], start, start + numel)
        if not pos.numel():
            continue
        g0 = int(glob.min())
        buf = torch.empty(int(glob.max()) - g0 + 1, dtype=torch.float32)
        have = torch.zeros(buf.numel(), dtype=torch.bool)
        for i, (e, pl, v) in enumerate(found):
            for q in pl["pieces"]:
                if q["key"] != piece["key"]:
                    continue
                if len(q["global_shape"]) != len(piece["global_shape"]):
                    continue
                qpos, qglob = model_space.piece_index(q, pl["numel"], e["start"], e["start"] + e["numel"], piece["global_shape"])
                sel = (qglob >= g0) & (qglob < g0 + buf.numel())
                if not bool(sel.any()):
                    continue
                if i not in dense:
                    dense[i] = _dense(v, where)
                    if dense[i].numel() != e["numel"]:
                        raise ValueError(f"{where}: a saved entry decodes to {dense[i].numel()} values, its layout "
                                         f"says {e['numel']}: the checkpoint is damaged")  # fmt: skip
                buf[qglob[sel] - g0] = dense[i][qpos[sel]]
                have[qglob[sel] - g0] = True
        value[pos] = buf[glob - g0]
        covered[pos] = have[glob - g0]
        if piece["pad"]:  # rows beyond what was saved (a vocabulary padded for this TP size): no state, as Megatron
            value[pos[~have[glob - g0]]] = 0.0
            covered[pos] = True
    return value, covered


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


# ----------------------------------------------------------------------------------- legacy torch (dp_zero)
class PackedMoments:
    """One (buffer, dtype) entry of a packed legacy ``distrib_optim.pt``, where Megatron's dp_zero form has a
    dict of world tensors: the main params only (``"param"``, ``"numel_unpadded"``); the moments are in the
    file's ``"stquant"`` entry. Stock Megatron's ``torch.load`` (``weights_only``) stops at this class,
    naming it; a loader that gets past that and asks for a moment gets ``KeyError`` quoting
    ``PACKED_DP_ZERO`` (the way back). ``stquant_megatron.megatron.patch`` allowlists it for ``torch.load``."""

    def __init__(self, param: torch.Tensor, numel_unpadded: int):
        self.param, self.numel_unpadded = param, int(numel_unpadded)

    def __getitem__(self, key: str) -> Any:
        if key in ("param", "numel_unpadded"):
            return getattr(self, key)
        raise KeyError(f"{key!r}: this distrib_optim.pt is {PACKED_DP_ZERO}")


def _dp_zero(distopt: Any) -> tuple[Any, int, int, int]:
    group = distopt.data_parallel_group_gloo
    if group is None:
        raise ValueError("packed legacy torch checkpoints need Megatron's gloo data-parallel group "
                         "(--no-gloo-process-groups was given?); use --ckpt-format torch_dist")  # fmt: skip
    return group, group.rank(), group.size(), torch.distributed.get_process_group_ranks(group)[0]


@torch.no_grad()
def params_dp_zero(distopt: Any, use_gloo_comm: bool = True, empty_data: bool = False,
                   return_on_all_ranks: bool = False, *, buffer_space: bool = False) -> dict[Any, Any] | None:  # fmt: skip
    """``get_parameter_state_dp_zero`` with the main params only (same arguments, same form: per buffer and
    dtype ``{"param": world tensor, "numel_unpadded": n}``, gathered bucket by bucket on data-parallel rank 0
    or on every rank): what Megatron's dp_zero-based formats (legacy ``torch``, ``fully_reshardable``) build
    their params from while the packed moments go separately. Nothing is built for the moments.

    ``buffer_space``: each bucket at its offset in the buffer (the world tensor as long as the buffer), the
    space of ``param_index_map`` that ``fully_reshardable`` slices parameters from. Megatron's own world
    tensors concatenate the buckets' unpadded parts, which shifts every parameter after a padded bucket (its
    "param range exceeds unpadded buffer" warning, e.g. the shared embedding's own bucket with pipeline
    parallelism): a fully_reshardable save of such a run stores those parameters shifted, zero-filled at the
    end. Legacy ``torch`` keeps Megatron's form (stock loads it)."""
    group = distopt.data_parallel_group_gloo if use_gloo_comm else distopt.data_parallel_group
    if group is None:
        raise ValueError("this checkpoint format gathers over Megatron's gloo data-parallel group, which this run "
                         "does not have (--no-gloo-process-groups?); use --ckpt-format torch_dist")  # fmt: skip
    rank, size = group.rank(), group.size()
    root = torch.distributed.get_process_group_ranks(group)[0]
    keep = rank == 0 or return_on_all_ranks
    device = "cpu" if use_gloo_comm or not torch.cuda.is_available() else torch.cuda.current_device()
    state: dict[Any, Any] = {"buckets_coalesced": True}
    for gbuf_idx, dtype, _, bucket, param_map, start in _buckets(distopt):
        numel = distopt.buffers[gbuf_idx].numel_unpadded
        if keep:
            size_w = distopt.buffers[gbuf_idx].numel if buffer_space else numel
            world = state.setdefault(gbuf_idx, {}).setdefault(
                dtype, {"param": torch.zeros(size_w, dtype=torch.float32), "numel_unpadded": numel})["param"]
        if empty_data:
            continue
        n_local = bucket.grad_data.numel() // size
        local = torch.zeros(n_local, dtype=torch.float32)
        for model_param, rm in param_map.items():
            shard = main_param(distopt, model_param).detach().reshape(-1).cpu()
            local[rm["gbuf_local"].start : rm["gbuf_local"].end].copy_(shard)
        local = local.to(device)
        recv = [torch.zeros_like(local) for _ in range(size)] if keep else None
        if return_on_all_ranks:
            torch.distributed.all_gather(recv, local, group)
        else:
            torch.distributed.gather(local, recv, root, group)
        if keep:
            at, n = (int(bucket.offset), bucket.grad_data.numel()) if buffer_space else (start, int(bucket.numel_unpadded))
            world[at : at + n].copy_(torch.cat(recv)[:n].cpu())
    return state if keep else None


@torch.no_grad()
def legacy_state(distopt: Any) -> dict[str, Any] | None:
    """What ``get_parameter_state_dp_zero`` returns, packed (collective over the gloo data-parallel group;
    the dict on its rank 0, None elsewhere): Megatron's dp_zero form holding the main params (gathered
    bucket by bucket, as Megatron does) and, under ``"stquant"``, every rank's moments as in memory with
    their layout. Nothing dense is built for the moments."""
    group, rank, size, root = _dp_zero(distopt)
    state = params_dp_zero(distopt)
    chunk, entries = _pack_chunk(distopt)
    gathered: list[Any] = [None] * size if rank == 0 else None
    torch.distributed.gather_object({"nbytes": chunk.numel(), "entries": entries, "chunk": chunk}, gathered, root, group)
    if rank != 0:
        return None
    for gbuf_idx, dtypes in state.items():
        if isinstance(gbuf_idx, int):
            state[gbuf_idx] = {dtype: PackedMoments(w["param"], w["numel_unpadded"]) for dtype, w in dtypes.items()}
    state["stquant"] = {"format": PACKED_DP_ZERO, "layout": _layout(gathered),
                        "packed": torch.cat([g.pop("chunk") for g in gathered])}  # fmt: skip
    return state


def _agree(group: Any, error: str | None) -> None:
    """Raise the first rank's error on every rank of ``group`` (before any rank changes anything)."""
    errors: list[Any] = [None] * group.size()
    torch.distributed.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise ValueError(first)


@torch.no_grad()
def legacy_load(distopt: Any, state_dict: Any) -> bool:
    """``load_parameter_state_from_dp_zero`` for a packed legacy file (collective over the gloo
    data-parallel group; ``state_dict`` on its rank 0). False, having done nothing, for a dense one.
    Rank 0 sends each rank the main params of its shards (as Megatron scatters them) and the byte ranges
    of the moments' entries that overlap them; every rank validates and re-codes its own (``validate``,
    ``prepare``), all agree that none failed, and only then do params and moments change."""
    group, rank, size, root = _dp_zero(distopt)
    packed = [isinstance(state_dict, dict) and isinstance(state_dict.get("stquant"), dict)]
    torch.distributed.broadcast_object_list(packed, src=root, group=group)
    if not packed[0]:
        return False
    wants: list[Any] = [None] * size if rank == 0 else None
    torch.distributed.gather_object(_wanted(distopt), wants, root, group)
    plans: list[Any] = [None] * size
    if rank == 0:
        plans = _legacy_plans(distopt, state_dict, wants)
    mine: list[Any] = [None]
    torch.distributed.scatter_object_list(mine, plans, src=root, group=group)
    plan = mine[0]
    error, prepared, params = plan.get("error"), None, []
    if error is None:
        try:
            loaded = {"layout": plan["layout"], "pieces": plan["pieces"]}
            prepared = prepare(distopt, loaded, validate(loaded))
            for gbuf_idx, dtype, _, bucket, param_map, start in _buckets(distopt):
                local = plan["params"][(gbuf_idx, start)]
                for model_param, rm in param_map.items():
                    main = main_param(distopt, model_param)
                    value = local[rm["gbuf_local"].start : rm["gbuf_local"].end]
                    if value.numel() != main.numel():
                        raise ValueError(f"legacy checkpoint: {value.numel()} param values for a shard of {main.numel()}")
                    params.append((main, value))
        except ValueError as e:
            error = str(e)
    _agree(group, error)
    for main, value in params:
        main.copy_(value.view_as(main))
    commit(distopt, prepared)
    return True


def _legacy_plans(distopt: Any, state_dict: dict, wants: list[Any]) -> list[dict[str, Any]]:
    """Rank 0's message to each rank: its params bucket by bucket and its moments' pieces (or an error)."""
    size = len(wants)
    st = state_dict["stquant"]
    try:
        if not str(st.get("format", "")).startswith("dp_zero+stquant_packed"):  # PACKED_DP_ZERO, any wording
            raise ValueError(f"distrib_optim.pt: unknown stquant format {st.get('format')!r}")
        layout, data = legacy_payload(st, "distrib_optim.pt")
        params: list[dict] = [{} for _ in range(size)]
        for gbuf_idx, dtype, _, bucket, param_map, start in _buckets(distopt):
            entry = state_dict.get(gbuf_idx, {}).get(dtype) if isinstance(state_dict.get(gbuf_idx), dict) else None
            numel = distopt.buffers[gbuf_idx].numel_unpadded
            got = entry.numel_unpadded if isinstance(entry, PackedMoments) else None
            if got != numel or not torch.is_tensor(entry.param) or entry.param.numel() != numel:
                raise ValueError(f"distrib_optim.pt: buffer {gbuf_idx} ({dtype}) holds {got} elements, this model "
                                 f"{numel}: the checkpoint is for another model or parallel layout")  # fmt: skip
            n, world_n = int(bucket.numel_unpadded), bucket.grad_data.numel()
            world = torch.nn.functional.pad(entry.param.float()[start : start + n], (0, world_n - n))
            for r, piece in enumerate(world.chunk(size)):
                params[r][(gbuf_idx, start)] = piece.clone()
    except (KeyError, TypeError, ValueError) as e:
        return [{"error": f"cannot load this packed legacy checkpoint: {e}"}] * size
    plans = []
    for r in range(size):
        pieces = {}
        for sr, j, lo, hi in _needed(layout, wants[r]):
            base = layout["ranks"][sr]["offset"]
            pieces[f"{sr}.{j}"] = data[base + lo : base + hi].clone()  # short if truncated: ``validate`` says so
        plans.append({"layout": layout, "pieces": pieces, "params": params[r]})
    return plans


def default_format() -> str:
    return check_format(os.environ.get("STQUANT_CHECKPOINT_FORMAT", "dense"), "STQUANT_CHECKPOINT_FORMAT")
