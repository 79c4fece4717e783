"""Offline conversion of packed torch_dist checkpoints to Megatron's dense format
(``stquant-megatron checkpoint convert SRC DST --to dense``): one process, no GPU, no process group.

A packed checkpoint (``packed_checkpoint``) keeps Megatron's own tensors (model weights, the
distributed optimizer's fp32 ``param`` bucket tensors, non-tensor state) and, per data-parallel group,
the moments as they were in memory plus a layout that records every entry's place in Megatron's
bucket space. The converter copies every stored item except the packed moments and their layout,
decodes each entry (codes and scales, factored statistics, fp32 escapes) into the dense
``<bucket key>.exp_avg`` / ``.exp_avg_sq`` fp32 tensors that stock Megatron's ``dp_reshardable`` writes
(padding between parameters: zeros, as it holds no state), and rewrites the sharding type in
the common state (``common.pt``, or its stored object in megatron-core 0.19) to ``dp_reshardable``. A packed
``fully_reshardable`` checkpoint becomes stock's model-space ``optimizer.state.exp_avg.<key>`` /
``.exp_avg_sq.<key>`` tensors (each entry scattered to its global elements by its placement), sharding type
``fully_reshardable``. Stock Megatron (or stquant with ``--stquant-checkpoint-format
dense``) then loads the result like any dense checkpoint. The values are the dequantized moments: what
the patched run itself would hand to a dense save.

Host memory: the whole converted checkpoint is built in memory before it is written (its dense size).
``--to packed`` is not offered: a patched run loads dense checkpoints (quantizing them) and saves packed.
"""

from __future__ import annotations

import io
import os
import shutil
import zlib
from typing import Any

import torch

from .model_space import MODEL_SPACE, piece_index, prefix_of
from .packed_checkpoint import (
    LAYOUT_VERSION,
    _decode_entry,
    _dense,
    entry_where,
    factored_shard,
    is_packed_type,
    packed_kind,
    span,
)


def _walk_replace(obj: Any, fn):
    if isinstance(obj, dict):
        return {k: _walk_replace(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk_replace(v, fn) for v in obj]
    return fn(obj)


def _raw_bytes_planner():
    """DCP's default save planner, except that an ``io.BytesIO`` item is written as its bytes (the default
    torch.save()s every bytes item, which would wrap Megatron's already serialized objects once more)."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class _RawBytesPlanner(DefaultSavePlanner):
        def transform_object(self, write_item, object):
            if write_item.type == WriteItemType.BYTE_IO and isinstance(object, io.BytesIO):
                return object
            return super().transform_object(write_item, object)

    return _RawBytesPlanner(flatten_state_dict=False)


def _raw_bytes(src: str, md: Any, key: str) -> bytes:
    """The stored bytes of a bytes item, read from its file as written (no deserialization)."""
    infos = [(i, s) for i, s in md.storage_data.items() if i.fqn == key]
    if len(infos) != 1 or getattr(infos[0][1], "transform_descriptors", None):
        raise ValueError(f"{key}: stored as {len(infos)} pieces or transformed (compressed); not supported")
    info = infos[0][1]
    with open(os.path.join(src, info.relative_path), "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    if len(data) != info.length:
        raise ValueError(f"{key}: {len(data)} of {info.length} bytes in {info.relative_path}: the checkpoint is truncated")
    return data


def _entry_values(e: dict, data: torch.Tensor, base: int, rank: int, prefix: str = "") -> tuple[torch.Tensor, str]:
    """(dense fp32 values of one layout entry, how errors name it), decoded from its saving rank's chunk
    at ``base`` in ``data``."""
    lo, hi = span(e)
    where = prefix + entry_where(e, rank)
    value = _decode_entry(e, data[base + lo : base + hi], where)
    if isinstance(value, dict) and value.get("factored"):
        value = factored_shard(value, e["start"], e["numel"])
    values = _dense(value, where)
    if values.numel() != e["numel"]:
        raise ValueError(f"{where}: {values.numel()} values decoded, the layout says {e['numel']}")
    return values, where


def _check_dst(dst: str) -> None:
    if os.path.exists(dst) and os.listdir(dst):
        raise ValueError(f"{dst!r} exists and is not empty; give a new directory")


def _read_torch_dist(src: str, dst: str) -> tuple[dict, dict, Any, str | None, str, Any]:
    """(stored tensors and our layouts, Megatron's pickled objects as bytes, the common state, its stored key
    (megatron-core 0.19) or None, the path of common.pt, the optimizer sharding type) of a torch_dist
    checkpoint directory, read in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    _check_dst(dst)
    if not os.path.isfile(os.path.join(src, ".metadata")):
        raise ValueError(f"{src!r} is neither a torch_dist checkpoint directory (no .metadata) nor a legacy torch one "
                         "(no mp_rank_*/distrib_optim.pt); give the iter_XXXXXXX folder of a save")  # fmt: skip
    reader = FileSystemReader(src)
    md = reader.read_metadata()
    # the common (non-sharded) state: common.pt (megatron-core <= 0.16) or the stored object common_state (0.19)
    common_pt = os.path.join(src, "common.pt")
    common_key = next((k for k in md.state_dict_metadata if k.split("/")[0] == "common_state"), None)
    if os.path.isfile(common_pt):
        common = torch.load(common_pt, map_location="cpu", weights_only=False)
    elif common_key is not None:
        common = torch.load(io.BytesIO(_raw_bytes(src, md, common_key)), map_location="cpu", weights_only=False)
    else:
        raise ValueError(f"{src!r} has neither common.pt nor a common_state object: not a Megatron torch_dist checkpoint")
    found = []
    _walk_replace(common, lambda x: found.append(x) if isinstance(x, str) and x.split("+")[0] in _KINDS else None)
    state: dict[str, Any] = {}
    raw: dict[str, bytes] = {}  # Megatron's pickled objects, copied byte for byte
    for key, meta in md.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            state[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        elif isinstance(meta, BytesStorageMetadata) and ".stquant_layout" in key:
            state[key] = io.BytesIO()
        elif isinstance(meta, BytesStorageMetadata):
            raw[key] = _raw_bytes(src, md, key)
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state, raw, common, common_key, common_pt, found[0] if found else None


_KINDS = ("dp_reshardable", "fully_reshardable", "dp_zero_gather_scatter", "fully_sharded_model_space", "fsdp_dtensor")


def _write_torch_dist(src: str, dst: str, state: dict, raw: dict, common: Any, common_key: str | None, common_pt: str) -> None:
    """Write ``state`` (+ Megatron's objects byte for byte, the common state) as a torch_dist checkpoint ``dst``,
    with the small files of ``src`` beside it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    state.update({key: io.BytesIO(b) for key, b in raw.items()})  # written back byte for byte (_RawBytesPlanner)
    os.makedirs(dst, exist_ok=True)
    if common_key is not None and not os.path.isfile(common_pt):
        buf = io.BytesIO()
        torch.save(common, buf)
        state[common_key] = buf
    dcp.save(state, storage_writer=FileSystemWriter(dst), planner=_raw_bytes_planner(), no_dist=True)
    if os.path.isfile(common_pt):
        torch.save(common, os.path.join(dst, "common.pt"))
    for name in os.listdir(src):  # Megatron's own small files (metadata.json, ...): as they are
        path = os.path.join(src, name)
        if os.path.isfile(path) and not os.path.exists(os.path.join(dst, name)) and not name.endswith(".distcp"):
            shutil.copy2(path, os.path.join(dst, name))


def convert_to_dense(src: str, dst: str) -> dict[str, int]:
    """Write the dense form of the packed torch_dist or legacy torch checkpoint directory ``src`` (one ``iter_*`` folder)
    to the new directory ``dst``. Returns counts (entries decoded, bucket tensors written). Raises
    ValueError with what was wrong (not a torch_dist checkpoint, not packed, damaged entries)."""
    _check_dst(dst)
    if not os.path.isfile(os.path.join(src, ".metadata")) and _legacy_files(src):
        return convert_legacy_to_dense(src, dst)
    state, raw, common, common_key, common_pt, kind = _read_torch_dist(src, dst)
    if not is_packed_type(kind):
        raise ValueError(f"{src!r} has distrib_optim_sharding_type={kind!r}: it is not a packed stquant checkpoint "
                         "(nothing to convert; stock Megatron loads it as it is)")  # fmt: skip
    layouts = [k for k in state if k.split("/")[0].endswith(".stquant_layout")]
    if not layouts:
        raise ValueError(f"{src!r} says it is packed but holds no stquant_layout object: the checkpoint is damaged")
    entries = buckets = 0
    for lkey in layouts:
        layout = state.pop(lkey)
        layout = layout[0] if isinstance(layout, list) else layout
        if not isinstance(layout, dict) or layout.get("version") != LAYOUT_VERSION:
            raise ValueError(f"{lkey}: not a stquant layout of version {LAYOUT_VERSION}; convert it with the "
                             "stquant-megatron version that wrote it")  # fmt: skip
        pkey = lkey.split("/")[0][: -len("stquant_layout")] + "stquant_packed"
        if pkey not in state:
            raise ValueError(f"{pkey} is missing from {src!r}: the checkpoint is damaged")
        packed = state.pop(pkey)
        if layout.get("kind") == "fully_reshardable":
            prefix = lkey[: lkey.index(MODEL_SPACE)]  # a chained optimizer's, if any
            n, model_space = _model_space_dense(layout, packed)
            entries += n
            for (moment, model_key), t in model_space.items():
                key, param_key = (f"{prefix}optimizer.state.{m}.{model_key}" for m in (moment, "param"))
                if param_key not in state or tuple(state[param_key].shape) != tuple(t.shape):
                    raise ValueError(f"{key}: the checkpoint has no {param_key} tensor of shape {tuple(t.shape)} beside it")
                state[key] = t
                buckets += 1
            continue
        dense = {}
        for r, rank in enumerate(layout["ranks"]):
            for e in rank["entries"]:
                if "bucket_key" not in e:
                    raise ValueError(f"{lkey}: entries without their bucket-space place (an older layout); load the "
                                     "checkpoint with stquant-megatron and save it with --stquant-checkpoint-format dense")  # fmt: skip
                values, _ = _entry_values(e, packed, rank["offset"], r)
                key = f"{e['bucket_key']}.{e['moment']}"
                if key not in dense:
                    dense[key] = torch.zeros(int(e["bucket_numel"]), dtype=torch.float32)
                dense[key][e["bucket_offset"] : e["bucket_offset"] + e["numel"]] = values
                entries += 1
        for key, t in dense.items():
            if f"{key[: key.rindex('.')]}.param" not in state:
                raise ValueError(f"{key}: the checkpoint has no {key[: key.rindex('.')]}.param tensor beside it")
            state[key] = t
            buckets += 1
    common = _walk_replace(common, lambda x: packed_kind(x) if is_packed_type(x) else x)
    _write_torch_dist(src, dst, state, raw, common, common_key, common_pt)
    return {"entries": entries, "bucket_tensors": buckets}  # torch_dist (model-space tensors for fully_reshardable)


def _model_space_dense(layout: dict, packed: torch.Tensor) -> tuple[int, dict[tuple[str, str], torch.Tensor]]:
    """(entries decoded, stock fully_reshardable's dense moments in model space by (moment, model key)) of a
    packed fully_reshardable layout: every entry scattered to its global elements."""
    dense: dict[tuple[str, str], torch.Tensor] = {}
    count = 0
    for r, rank in enumerate(layout["ranks"]):
        for e in rank["entries"]:
            place = rank["placements"].get(e["name"])
            if place is None:
                raise ValueError(f"{entry_where(e, r)}: no placement in the layout: the checkpoint is damaged")
            values, where = _entry_values(e, packed, rank["offset"], r)
            for piece in place["pieces"]:
                pos, glob = piece_index(piece, place["numel"], e["start"], e["start"] + e["numel"])
                key = (e["moment"], piece["key"])
                t = dense.setdefault(key, torch.zeros(piece["global_shape"], dtype=torch.float32))
                if list(t.shape) != piece["global_shape"]:
                    raise ValueError(f"{where}: {piece['key']} has global shape {piece['global_shape']} here and {list(t.shape)} "
                                     "in another entry: the checkpoint is damaged")  # fmt: skip
                t.view(-1)[glob] = values[pos]
            count += 1
    return count, dense


# ----------------------------------------------------------------------------------- dense -> packed
def convert_to_packed(src: str, dst: str, bits: int = 8) -> dict[str, int]:
    """Write the packed form of the dense ``fully_reshardable`` torch_dist checkpoint ``src`` (stock Megatron's
    or a dense stquant one) to ``dst``: each model-space moment quantized whole at ``bits`` (nearest rounding,
    the default config's block size and codebooks; tensors under its ``min_numel`` stay fp32), placed as one
    entry covering its global tensor. A patched run at any TP/PP/DP size then loads it as it loads its own
    packed fully_reshardable checkpoints (re-coding each shard at its widths). Other formats keep no
    parameter boundaries in their files (bucket space): load them in a patched run and save packed."""
    from ..config import STQuantConfig
    from ..state import PackedState
    from .packed_checkpoint import _HEADER, PACKED_FULLY_RESHARDABLE, _moment_record

    state, raw, common, common_key, common_pt, kind = _read_torch_dist(src, dst)
    if kind != "fully_reshardable":
        raise ValueError(f"{src!r} has distrib_optim_sharding_type={kind!r}; --to packed takes dense fully_reshardable "
                         "checkpoints (--dist-ckpt-optim-fully-reshardable), whose files place every moment in model "
                         "space. Load this one in a run with stquant-megatron and save it with "
                         "--stquant-checkpoint-format packed")  # fmt: skip
    cfg = STQuantConfig(bits=bits)
    groups: dict[str, dict[str, Any]] = {}
    for key in sorted(k for k in state if ".state.exp_avg." in k or ".state.exp_avg_sq." in k):
        head, rest = key.split("optimizer.state.", 1)
        moment, model_key = rest.split(".", 1)
        if moment not in ("exp_avg", "exp_avg_sq") or f"{head}optimizer.state.param.{model_key}" not in state:
            continue
        dense = state.pop(key).float()
        g = groups.setdefault(head + prefix_of(model_key), {"parts": [torch.zeros(_HEADER, dtype=torch.uint8)],
                                                                          "entries": [], "placements": {}})  # fmt: skip
        shape, numel = list(dense.shape), dense.numel()
        if numel >= cfg.min_numel:
            signed = moment == "exp_avg"
            dense = PackedState.zeros(numel, bits=bits, kind=cfg.codebook(moment, bits), signed=signed,
                                      block_size=cfg.block_size).copy_(dense)  # fmt: skip
        plain, tensors = _moment_record(dense)
        offset, spec, crc = sum(t.numel() for t in g["parts"]), {}, 0
        for tname, t in tensors.items():
            b = t.detach().contiguous().reshape(-1).view(torch.uint8)
            spec[tname] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset,
                           "nbytes": b.numel()}  # fmt: skip
            crc = zlib.crc32(b.numpy(), crc)
            g["parts"].append(b)
            offset += b.numel()
        g["entries"].append({"name": model_key, "start": 0, "numel": numel, "moment": moment, "plain": plain,
                             "tensors": spec, "crc32": crc})  # fmt: skip
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        g["placements"][model_key] = {"numel": numel, "main": True, "pieces": [
            {"key": model_key, "global_shape": shape, "global_offset": [0] * len(shape), "prepend": 0, "shape": shape,
             "stride": strides, "at": 0, "pad": False}]}  # fmt: skip
    if not groups:
        raise ValueError(f"{src!r} holds no dense optimizer.state.exp_avg / exp_avg_sq tensors: nothing to pack")
    count = 0
    for prefix, g in groups.items():
        chunk = torch.cat(g["parts"])
        chunk[:8] = torch.tensor([LAYOUT_VERSION], dtype=torch.int64).view(torch.uint8)
        chunk[8:16] = torch.tensor([chunk.numel()], dtype=torch.int64).view(torch.uint8)
        state[f"{prefix}.stquant_packed"] = chunk
        layout = {"version": LAYOUT_VERSION, "kind": "fully_reshardable", "dp_size": 1, "total": chunk.numel(),
                  "ranks": [{"offset": 0, "nbytes": chunk.numel(), "entries": g["entries"], "placements": g["placements"]}]}
        buf = io.BytesIO()
        torch.save([layout], buf)  # as Megatron stores a ShardedObject (a list of its shards)
        state[f"{prefix}.stquant_layout/shard_0_1"] = buf
        count += len(g["entries"])
    common = _walk_replace(common, lambda x: PACKED_FULLY_RESHARDABLE if x == "fully_reshardable" else x)
    _write_torch_dist(src, dst, state, raw, common, common_key, common_pt)
    return {"entries": count, "layouts": len(groups)}


# ----------------------------------------------------------------------------------- legacy torch
def _legacy_files(src: str) -> list[str]:
    """The ``distrib_optim.pt`` files of a legacy torch checkpoint directory (one per TP/PP rank)."""
    if not os.path.isdir(src):
        return []
    return sorted(os.path.join(src, d, "distrib_optim.pt") for d in os.listdir(src)
                  if d.startswith("mp_rank_") and os.path.isfile(os.path.join(src, d, "distrib_optim.pt")))  # fmt: skip


def _legacy_dense(state: Any, where: str) -> tuple[Any, int]:
    """One optimizer's packed dp_zero state -> stock Megatron's dense one (entries decoded)."""
    from .packed_checkpoint import PackedMoments, legacy_payload

    if not isinstance(state, dict) or not isinstance(state.get("stquant"), dict):
        return state, 0
    layout, data = legacy_payload(state.pop("stquant"), where)
    worlds: dict[int, dict[str, Any]] = {}
    for gbuf_idx, dtypes in state.items():
        if not isinstance(gbuf_idx, int):
            continue
        for dtype, entry in dtypes.items():
            if not isinstance(entry, PackedMoments):
                raise ValueError(f"{where}: buffer {gbuf_idx} ({dtype}) is not in the packed form")
            n = entry.numel_unpadded
            worlds[gbuf_idx] = {"dtype": dtype, "param": entry.param, "numel_unpadded": n,
                                "exp_avg": torch.zeros(n, dtype=torch.float32), "exp_avg_sq": torch.zeros(n, dtype=torch.float32)}  # fmt: skip
    count = 0
    for r, rank in enumerate(layout["ranks"]):
        for e in rank["entries"]:
            world = worlds.get(e.get("buffer"))
            if world is None or "world_offset" not in e:
                raise ValueError(f"{where}: {entry_where(e, r)}: its buffer is not in the file: the checkpoint is damaged")
            values, at = _entry_values(e, data, rank["offset"], r, f"{where}: ")
            if e["world_offset"] + e["numel"] > world["numel_unpadded"]:
                raise ValueError(f"{at}: {values.numel()} values at {e['world_offset']} do not fit the buffer")
            world[e["moment"]][e["world_offset"] : e["world_offset"] + e["numel"]] = values
            count += 1
    for gbuf_idx, w in worlds.items():
        state[gbuf_idx] = {w.pop("dtype"): w}
    return state, count


def convert_legacy_to_dense(src: str, dst: str) -> dict[str, int]:
    """The legacy torch checkpoint directory ``src``: every file copied, each packed ``distrib_optim.pt``
    (one per TP/PP rank; a list of states for a chained optimizer, e.g. MoE) rewritten in stock
    Megatron's dense dp_zero form."""
    from .packed_checkpoint import PackedMoments

    files = _legacy_files(src)
    total = 0
    with torch.serialization.safe_globals([PackedMoments]):
        converted = {}
        for path in files:
            rel = os.path.relpath(path, src)
            data = torch.load(path, map_location="cpu", weights_only=True)
            states = data if isinstance(data, list) else [data]
            out = []
            for i, st in enumerate(states):
                st, n = _legacy_dense(st, f"{rel}[{i}]" if isinstance(data, list) else rel)
                out.append(st)
                total += n
            converted[rel] = out if isinstance(data, list) else out[0]
    if total == 0:
        raise ValueError(f"{src!r} holds no packed stquant moments (nothing to convert; stock Megatron loads it as it is)")
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if n == "distrib_optim.pt"])
    for rel, data in converted.items():
        torch.save(data, os.path.join(dst, rel))
    return {"entries": total, "files": len(converted)}
