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


def signed_log_levels(bits: int, step: float) -> torch.Tensor:
    """A candidate signed log codebook (not one of ours): 0 and +-2**(-(L - k) * step), k = 1..L,
    L = 2**(bits - 1) - 1 (the same number of levels as the signed kinds)."""
    n = 2 ** (bits - 1) - 1
    pos = torch.exp2(-(n - torch.arange(1, n + 1, dtype=torch.float32)) * step)
    return torch.cat([-pos.flip(0), torch.zeros(1), pos])


def roundtrip_levels(x: torch.Tensor, levels: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Block absmax scaling and nearest rounding to sorted ``levels`` in [-1, 1] (fp32 reference)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    xb = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    scale = xb.abs().amax(1, keepdim=True).clamp_min(1e-30)
    y = xb / scale
    mids = (levels[1:] + levels[:-1]) / 2
    q = levels[torch.bucketize(y, mids)]
    return (q * scale).view(-1)[: flat.numel()].view_as(x)


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

    # Candidate (issue: a signed log codebook for exp_avg at 2-3 bits): at 2 bits every signed kind is
    # {-1, 0, 1}; at 3 and 4 bits, signed log levels with several octave steps against ours.
    def err_levels(levels: torch.Tensor) -> float:
        num = den = 0.0
        for m, v in units:
            ref = m / (v.sqrt() + 1e-8)
            u = roundtrip_levels(m, levels) / (v.sqrt() + 1e-8)
            num += float(((u - ref) ** 2).sum())
            den += float((ref**2).sum())
        return num / den

    steps = (0.5, 1.0, 1.5, 2.0, 3.0)
    print("\nexp_avg, candidate signed log codebook (octaves between levels), same error E")
    print("            " + " ".join(f"{'log/' + str(st):>10s}" for st in steps) + f" {'pow2':>10s} {'linear':>10s}")
    for bits in (3, 4):
        cand = [err_levels(signed_log_levels(bits, st)) for st in steps]
        print(f"  {bits} bits  " + " ".join(f"{e:10.4g}" for e in cand)
              + f" {err('exp_avg', 'pow2', bits):10.4g} {err('exp_avg', 'linear', bits):10.4g}")


if __name__ == "__main__":
    main()
