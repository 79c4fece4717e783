"""Where a parameter's elements live in Megatron's model space (the ``fully_reshardable`` checkpoint format):
placements of local tensors and global element indices, for packed checkpoints (``packed_checkpoint``) and
the offline converter (``convert``). No process group, no optimizer: plain functions of Megatron's
``ShardedTensor`` metadata.

A *placement* describes a local (TP-local) parameter tensor of ``numel`` elements: one *piece* per
``ShardedTensor`` Megatron saves it as (``key``, ``global_shape``, ``global_offset``, ``prepend`` axes,
``pad`` = ``allow_shape_mismatch``), each with the strided view (``shape``, ``stride``, storage offset
``at``) of the flat local tensor that fills it (a factory such as the SwiGLU ``linear_fc1`` split is built
on an index tensor, so every element is mapped exactly).
"""

from __future__ import annotations

from typing import Any

import torch

MODEL_SPACE = "optimizer.fully_reshardable"
"""Key prefix of packed model-space moments (``<MODEL_SPACE>.<dense|expert>.stquant_packed`` / ``_layout``)."""


def sharded_leaves(tree: Any) -> list:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in sharded_leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in sharded_leaves(v)]
    return [tree]


def placement(sh: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    """Where the elements of a local tensor of ``shape``, saved by Megatron as ``sh`` (its model
    ShardedTensor or ShardedTensorFactory), live in model space."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    numel = 1
    for n in shape:
        numel *= int(n)
    if isinstance(sh, ShardedTensorFactory):  # built on an index tensor: each piece is a view saying which elements
        idx = torch.arange(numel, dtype=torch.int64).reshape(shape)
        built = sharded_leaves(dataclasses.replace(sh, data=idx).build())
    else:
        idx = torch.empty(shape, dtype=torch.uint8, device="meta")  # the whole tensor, contiguous (no memory)
        built = [sh]
    pieces = []
    for t in built:
        data = idx if t is sh else t.data
        ok = isinstance(t, ShardedTensor) and t.flattened_range is None and torch.is_tensor(data)
        if not ok or (t is not sh and data.untyped_storage().data_ptr() != idx.untyped_storage().data_ptr()):
            raise ValueError(f"{sh.key}: Megatron saves this parameter in a form packed checkpoints do not map "
                             f"({type(t).__name__}); save with --stquant-checkpoint-format dense")  # fmt: skip
        pieces.append({"key": t.key, "global_shape": [int(x) for x in t.global_shape],
                       "global_offset": [int(x) for x in t.global_offset], "prepend": int(t.prepend_axis_num),
                       "shape": list(data.shape), "stride": list(data.stride()), "at": int(data.storage_offset()),
                       "pad": bool(t.allow_shape_mismatch)})  # fmt: skip
    return {"numel": numel, "pieces": pieces}


def main_replica(replica_id: Any) -> bool:
    """Whether a model tensor's replica id is the main one apart from its data-parallel part (the last): the
    copy Megatron saves (tied output layers and tensor-parallel copies of replicated tensors are not)."""
    ids = replica_id if isinstance(replica_id, (tuple, list)) else (replica_id, 0)
    return all(int(x) == 0 for x in ids[:-1])


def piece_index(piece: dict, numel: int, lo: int, hi: int, shape: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions ``- lo`` of the local flat elements in ``[lo, hi)`` that fill ``piece``, their flat indices in
    a global tensor of ``shape`` (default: the piece's own global shape; elements outside it are left out,
    as a tensor Megatron saves with ``allow_shape_mismatch``, e.g. a vocabulary padded for another TP size,
    is narrowed))."""
    shape = piece["global_shape"] if shape is None else shape
    pre, off = piece["prepend"], piece["global_offset"]
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    local = torch.arange(numel, dtype=torch.int64).as_strided(piece["shape"], piece["stride"], piece["at"])
    glob = torch.full(piece["shape"], sum(off[d] * strides[d] for d in range(pre)), dtype=torch.int64)
    inside = torch.ones(piece["shape"], dtype=torch.bool)
    for d, n in enumerate(piece["shape"]):
        view = [1] * len(piece["shape"])
        view[d] = n
        coord = off[pre + d] + torch.arange(n, dtype=torch.int64)
        glob += (coord * strides[pre + d]).view(view)
        inside &= (coord < shape[pre + d]).view(view)
    sel = (local >= lo) & (local < hi) & inside
    return local[sel] - lo, glob[sel]


def boxes(places: Any) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Global boxes (offset, extent) of the placements' pieces, by key."""
    out: dict[str, list] = {}
    for place in places:
        for p in place["pieces"]:
            out.setdefault(p["key"], []).append((p["global_offset"], [1] * p["prepend"] + p["shape"]))
    return out


def meets(place: dict, against: dict) -> bool:
    """Whether a placement's pieces meet any of the boxes ``against`` (``boxes``; a box test: it may say yes
    for a shard that only its box overlaps)."""
    for p in place["pieces"]:
        lo, ext = p["global_offset"], [1] * p["prepend"] + p["shape"]
        for lo_q, ext_q in against.get(p["key"], ()):
            if len(lo) == len(lo_q) and all(a < b + m and b < a + n for a, n, b, m in zip(lo, ext, lo_q, ext_q)):
                return True
    return False


def same_place(a: dict | None, b: dict | None) -> bool:
    return a is b or (a is not None and b is not None and a["numel"] == b["numel"] and a["pieces"] == b["pieces"])


def prefix(expert: bool) -> str:
    """Where one optimizer's packed model-space moments go: a key per kind of optimizer (Megatron chains a
    dense and an expert-parallel one for MoE and does not prefix model-space keys per chained optimizer),
    the same at every parallel layout."""
    return f"{MODEL_SPACE}.{'expert' if expert else 'dense'}"


def prefix_of(model_key: str) -> str:
    """``prefix`` of a parameter, offline, from its model-space key (Megatron's expert modules are ``experts``)."""
    return prefix(".experts." in f".{model_key}")
