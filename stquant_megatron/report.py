"""Scheduler history -> heatmap (units x decisions, colour = bits) and a table.

Width 0 is a factored exp_avg_sq (row and column statistics, ``exp_avg_sq_format="auto"``): "F" in
the table, grey in the heatmap.

The full history is the JSON-lines file a scheduler appends to, one line per decision
(``optimizer.scheduler.history_path``; under Megatron-LM rank 0 keeps
``<--save>/stquant_history.jsonl``). Checkpoints and the in-memory scheduler keep the last few
decisions only (``PrecisionScheduler.state_dict()["history"]`` with its ``names``); they are read
too, and ``save_history`` writes them as JSON.

    stquant-megatron report CHECKPOINT_OR_JSON [--out bits.png]
"""

from __future__ import annotations

import json
import os
from typing import Any


def history_of(obj: Any) -> dict[str, Any]:
    """``{"names": [...], "history": [...]}`` from an optimizer, a scheduler state dict, a
    checkpoint (any nesting; torch_dist directories: their ``common.pt``; loaded with
    ``weights_only=True``), a JSON file or a JSON-lines history file (``.jsonl``)."""
    if hasattr(obj, "scheduler") and getattr(obj, "scheduler", None) is not None:
        obj = obj.scheduler.state_dict()
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if os.path.isdir(path):
            path = os.path.join(path, "common.pt")
        if path.endswith(".jsonl"):
            from .scheduler import read_history

            return read_history(path)
        if path.endswith(".json"):
            with open(path) as f:
                obj = json.load(f)
        else:
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
    found = _find(obj)
    if found is None:
        raise ValueError("no stquant scheduler history found (was the run made with avg_bits / --stquant-avg-bits?)")
    return {"names": list(found["names"]), "history": list(found["history"])}


def _find(obj: Any):
    if isinstance(obj, dict):
        if "names" in obj and "history" in obj:
            return obj
        for v in obj.values():
            hit = _find(v)
            if hit is not None:
                return hit
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            hit = _find(v)
            if hit is not None:
                return hit
    return None


def save_history(optimizer: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(history_of(optimizer), f)


def table(hist: dict[str, Any], last: int = 6) -> str:
    """Plain-text table: per unit, the bits at the last ``last`` decisions (F: factored) and its last error."""
    names, rows = hist["names"], hist["history"]
    if not rows:
        return "(no decisions yet)"
    shown = rows[-last:]
    width = max(len(n) for n in names)
    head = f"{'unit':{width}s} " + " ".join(f"{'@' + str(r['step']):>6s}" for r in shown) + "  last E"
    lines = [head, "-" * len(head)]
    for i, n in enumerate(names):
        cells = " ".join(f"{'F' if r['bits'][i] == 0 else r['bits'][i]:>6}" for r in shown)
        lines.append(f"{n:{width}s} {cells}  {shown[-1]['errors'][i]:.2e}")
    lines.append(
        f"{'average bits (scales incl.)':{width}s} " + " ".join(f"{r['avg_bits']:6.2f}" for r in shown)
        + f"\n{'units moved':{width}s} " + " ".join(f"{r['moved']:6d}" for r in shown)
    )  # fmt: skip
    return "\n".join(lines)


def heatmap(hist: dict[str, Any], path: str, title: str = "STQuant bits per unit") -> str:
    """Write a PNG heatmap: one row per unit, one column per decision, colour = bits (grey: factored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, rows = hist["names"], hist["history"]
    if not rows:
        raise ValueError("no decisions in the history: nothing to plot")
    bits = np.array([r["bits"] for r in rows]).T  # [units, decisions]
    data = np.where(bits == 0, 0, bits - 1)  # colour index: 0 = factored, 1..7 = 2..8 bits
    fig_h = max(3.0, 0.18 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 4), fig_h))
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#b0b0b0", *plt.get_cmap("viridis", 7)(np.arange(7))])
    im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=-0.5, vmax=7.5, interpolation="nearest")
    ax.set_yticks(range(len(names)), [n if len(n) < 48 else "..." + n[-45:] for n in names], fontsize=6)
    ax.set_xticks(range(len(rows)), [str(r["step"]) for r in rows], fontsize=7, rotation=90)
    ax.set_xlabel("step of decision")
    ax.set_title(f"{title} (average {rows[-1]['avg_bits']:.2f} bits incl. scales)")
    bar = fig.colorbar(im, ax=ax, ticks=range(8), label="bits (F: factored exp_avg_sq)")
    bar.ax.set_yticklabels(["F", *map(str, range(2, 9))])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
