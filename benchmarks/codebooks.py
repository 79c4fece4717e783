"""Which codebook per (moment, bits)? Measured on real Adam moments.

Trains a small byte-level transformer LM with fp32 AdamW on Python standard-library sources for
``--steps`` steps, then, for every moment, codebook kind and width, quantizes that moment alone
(block 128, nearest rounding) and measures the relative damage to Adam's update direction
U = m_hat / (sqrt(v_hat) + eps):

    E = sum ||U(Q(m), v) - U(m, v)||^2 / sum ||U(m, v)||^2       (exp_avg; likewise for exp_avg_sq)

over all matrices with >= 4096 elements. The kind with the lowest E at each width is the "auto"
choice in ``stquant_megatron/config.py``.

    python benchmarks/codebooks.py [--steps 300]
"""

from __future__ import annotations

import argparse
import pathlib
import sysconfig

import torch

from stquant_megatron.formats.codebooks import KINDS, LOG_STEP, get_codebook
from stquant_megatron.kernels.torch_adam import dequantize_blocks, quantize_blocks


def stdlib_bytes(limit: int) -> torch.Tensor:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for f in sorted(root.glob("*.py")):
        data += f.read_bytes()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def roundtrip(x: torch.Tensor, kind: str, bits: int, signed: bool, block: int = 128) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    xb = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    cb = get_codebook(kind, bits, signed)
    codes, scale = quantize_blocks(xb, cb, torch.float32)
    return dequantize_blocks(codes, scale, cb).view(-1)[: flat.numel()].view_as(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = stdlib_bytes(2_000_000)
    d, seq = 128, 64
    layer = torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
    model = torch.nn.ModuleDict(
        {"emb": torch.nn.Embedding(256, d), "body": torch.nn.TransformerEncoder(layer, 2), "head": torch.nn.Linear(d, 256)}
    )
    mask = torch.nn.Transformer.generate_square_subsequent_mask(seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        idx = torch.randint(0, data.numel() - seq - 1, (32,))
        x = torch.stack([data[i : i + seq] for i in idx])
        y = torch.stack([data[i + 1 : i + seq + 1] for i in idx])
        logits = model["head"](model["body"](model["emb"](x), mask=mask, is_causal=True))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 256), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f}", flush=True)
    beta1, beta2 = opt.param_groups[0]["betas"]
    units = []
    for p in model.parameters():
        st = opt.state[p]
        if p.numel() >= 4096:
            t = int(st["step"])
            units.append((st["exp_avg"] / (1 - beta1**t), st["exp_avg_sq"] / (1 - beta2**t)))

    def err(moment: str, kind: str, bits: int) -> float:
        num = den = 0.0
        for m, v in units:
            ref = m / (v.sqrt() + 1e-8)
            if moment == "exp_avg":
                u = roundtrip(m, kind, bits, True) / (v.sqrt() + 1e-8)
            else:
                u = m / (roundtrip(v, kind, bits, False).sqrt() + 1e-8)
            num += float(((u - ref) ** 2).sum())
            den += float((ref**2).sum())
        return num / den

    print("\nrelative update-direction error E (lower is better)")
    for moment, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        kinds = [k for k in KINDS if not (signed and k == "log")]
        print(f"\n{moment:10s} " + " ".join(f"{k:>10s}" for k in kinds) + "   best")
        for bits in range(2, 9):
            row = {k: err(moment, k, bits) for k in kinds if k != "log" or bits in LOG_STEP}
            print(f"  {bits} bits  " + " ".join(f"{row.get(k, float('nan')):10.4g}" for k in kinds) + f"   {min(row, key=row.get)}")


if __name__ == "__main__":
    main()
