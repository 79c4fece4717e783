"""Standalone demo: the same small byte-level transformer trained with fp32 AdamW and with
STQuantAdamW, on Python standard-library sources; prints state memory and losses.

    python examples/standalone_demo.py [--steps 300] [--bits 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from stquant_megatron import STQuantAdamW, STQuantConfig
from stquant_megatron.testing.data import lm_batches, stdlib_corpus

SEQ, BATCH = 64, 16


class TinyLM(torch.nn.Module):
    def __init__(self, d: int = 128, layers: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Parameter(torch.zeros(SEQ, d))
        layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, 256)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, x):
        return self.head(self.body(self.emb(x) + self.pos, mask=self.mask, is_causal=True))


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


def train(name, make_opt, steps, train_tokens, val_tokens):
    torch.manual_seed(0)
    model = TinyLM()
    opt = make_opt(model)
    t0, losses = time.perf_counter(), []
    for i, (x, y) in enumerate(lm_batches(train_tokens, batch=BATCH, seq=SEQ, steps=steps, seed=1)):
        loss = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (i + 1) % max(1, steps // 10) == 0:
            print(f"  [{name}] step {i + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.4f}", flush=True)
    with torch.no_grad():
        val = sum(loss_of(model, x, y).item() for x, y in lm_batches(val_tokens, batch=32, seq=SEQ, steps=20, seed=2)) / 20
    nparams = sum(p.numel() for p in model.parameters())
    state = opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )
    return dict(name=name, bytes_per_param=state / nparams, train=sum(losses[-20:]) / 20, val=val,
                seconds=time.perf_counter() - t0, params=nparams)  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    args = ap.parse_args()
    train_tokens, val_tokens = stdlib_corpus("train"), stdlib_corpus("val")
    runs = [("fp32 AdamW", lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.01))]
    for b in args.bits:
        runs.append((f"STQuant {b}-bit", lambda m, b=b: STQuantAdamW(
            m.named_parameters(), lr=2e-3, weight_decay=0.01, config=STQuantConfig(bits=b))))  # fmt: skip
    rows = [train(name, make, args.steps, train_tokens, val_tokens) for name, make in runs]
    base = rows[0]
    print(f"\n{rows[0]['params']:,} parameters, {args.steps} steps, batch {BATCH}x{SEQ} bytes of stdlib source")
    print(f"{'optimizer':16s} {'state B/param':>13s} {'memory saved':>12s} {'train loss':>10s} {'val loss':>9s} {'val/AdamW':>9s} {'time s':>7s}")
    for r in rows:
        saved = 1 - r["bytes_per_param"] / base["bytes_per_param"]
        print(f"{r['name']:16s} {r['bytes_per_param']:13.3f} {saved:12.1%} {r['train']:10.4f} {r['val']:9.4f} "
              f"{r['val'] / base['val']:9.4f} {r['seconds']:7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
