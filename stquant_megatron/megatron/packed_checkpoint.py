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

_WAY_BACK = ("load it with stquant-megatron installed (e.g. --stquant), or convert it to stock Megatron's dense form "
             "offline: stquant-megatron checkpoint convert SRC DST --to dense")  # fmt: skip
PACKED_DP_RESHARDABLE = f"dp_reshardable+stquant_packed (optimizer moments packed by stquant-megatron: {_WAY_BACK})"
"""``distrib_optim_sharding_type`` of a packed checkpoint (a stock run's error message quotes it)."""
PACKED_DP_ZERO = f"dp_zero+stquant_packed (optimizer moments packed by stquant-megatron: {_WAY_BACK})"
"""``format`` of the ``"stquant"`` entry of a packed legacy ``torch`` checkpoint's ``distrib_optim.pt``."""

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


def _pack_chunk(distopt: Any) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """(this rank's chunk: a header and every moment of its shards as in memory, the chunk's entries)."""
    inner = distopt.optimizer
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
        for r, j, lo, hi in _needed(layout, _wanted(req.owner)):
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


def _needed(layout: dict[str, Any], want: list[tuple[str, int, int]]) -> list[tuple[int, int, int, int]]:
    """(saving rank, entry index, byte range in its chunk) of the layout's entries that overlap the shards
    ``want``; a factored entry serves any shard of its matrix (its statistics describe the whole matrix)."""
    by_name: dict[str, list[tuple[int, int]]] = {}
    for name, s, n in want:
        by_name.setdefault(name, []).append((s, n))
    out = []
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
def legacy_state(distopt: Any) -> dict[str, Any] | None:
    """What ``get_parameter_state_dp_zero`` returns, packed (collective over the gloo data-parallel group;
    the dict on its rank 0, None elsewhere): Megatron's dp_zero form holding the main params (gathered
    bucket by bucket, as Megatron does) and, under ``"stquant"``, every rank's moments as in memory with
    their layout. Nothing dense is built for the moments."""
    group, rank, size, root = _dp_zero(distopt)
    state: dict[Any, Any] = {"buckets_coalesced": True}
    worlds: dict[tuple[int, Any], torch.Tensor] = {}
    for gbuf_idx, dtype, _, bucket, param_map, start in _buckets(distopt):
        n_local = bucket.grad_data.numel() // size
        local = torch.zeros(n_local, dtype=torch.float32)
        for model_param, rm in param_map.items():
            shard = main_param(distopt, model_param).detach().reshape(-1).cpu()
            local[rm["gbuf_local"].start : rm["gbuf_local"].end].copy_(shard)
        recv = [torch.zeros(n_local, dtype=torch.float32) for _ in range(size)] if rank == 0 else None
        torch.distributed.gather(local, recv, root, group)
        if rank == 0:
            numel = distopt.buffers[gbuf_idx].numel_unpadded
            world = worlds.setdefault((gbuf_idx, dtype), torch.zeros(numel, dtype=torch.float32))
            n = int(bucket.numel_unpadded)
            world[start : start + n].copy_(torch.cat(recv)[:n])
    chunk, entries = _pack_chunk(distopt)
    gathered: list[Any] = [None] * size if rank == 0 else None
    torch.distributed.gather_object({"nbytes": chunk.numel(), "entries": entries, "chunk": chunk}, gathered, root, group)
    if rank != 0:
        return None
    for (gbuf_idx, dtype), world in worlds.items():
        state.setdefault(gbuf_idx, {})[dtype] = PackedMoments(world, world.numel())
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
