"""Where a published number comes from, and whether it still describes the code.

Every results file a benchmark writes records ``provenance(...)``: the commit its process started
from (``+dirty`` with uncommitted changes to tracked files), the command, the machine, the versions,
the date, and a **code hash** per dependency set: a SHA-256 over the path and bytes of every tracked
file the numbers depend on (``DEPS``), read from the working tree when the measurement started (runs
recorded before hashes existed get theirs from their commit: ``code_hash_at``). The README and
docs blocks (``benchmarks/results_table.py``) recompute the same hashes from the working tree they are
generated in: equal, the block says the code it depends on is unchanged since the measurement;
different (or a file made before hashes were recorded), it says the numbers are stale. No git history
is needed to decide (a shallow clone decides the same), and a measurement taken on uncommitted
changes is judged by the code it really ran.

    python benchmarks/provenance.py            # the current hash of every dependency set
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The optimizer itself: everything under stquant_megatron/ except the Megatron seams, the test-only
# harness, the command-line front ends and checkpoint I/O (which change no number of a standalone
# training run: the benchmarks here never save or load), and the Triton
# kernels: every benchmark here except gpu_compile/gpu_step/gpu_day measures on the CPU, where the step
# is the PyTorch twin (kernels/torch_adam.py; the kernels are bit-identical to it, tests/test_kernels.py
# and tests/test_gpu_parity.py) and the Triton files never run.
_TRITON = ["!stquant_megatron/kernels/triton_adam.py", "!stquant_megatron/kernels/triton_factored.py"]
_CHECKPOINT_IO = ["!stquant_megatron/checkpoint.py", "!stquant_megatron/megatron/packed_checkpoint.py",
                  "!stquant_megatron/megatron/model_space.py", "!stquant_megatron/megatron/convert.py"]  # fmt: skip
_OPTIMIZER = ["stquant_megatron/**", "!stquant_megatron/megatron/**", "!stquant_megatron/testing/**",
              "!stquant_megatron/cli.py", "!stquant_megatron/report.py", "!stquant_megatron/launch.py",
              *_CHECKPOINT_IO, *_TRITON]  # fmt: skip
_FRONTIER = ["~benchmarks/frontier.py", "~benchmarks/quality.py", "stquant_megatron/testing/data.py"]
DEPS: dict[str, list[str]] = {
    "optimizer": _OPTIMIZER,
    # the step benchmark: the optimizer and the script
    "step": _OPTIMIZER + ["benchmarks/step.py"],
    # the frontier's reference and peer runs (fp32 AdamW, bitsandbytes, torchao): the model, data and loop
    # ("~": the file less its spec region; every run records its configuration, matched when reused)
    "frontier-peers": _FRONTIER,
    # the frontier's own runs: the same plus the optimizer
    "frontier": _OPTIMIZER + _FRONTIER,
    # the factoring signal on the frontier's model
    "factoring_signal": _OPTIMIZER + _FRONTIER + ["benchmarks/factoring_signal.py"],
    # the quality benchmark (Megatron GPT through the seams, digits ViT standalone; it never saves or
    # loads a checkpoint, and the memory model is the CLI's)
    "quality": ["stquant_megatron/**", "!stquant_megatron/cli.py", "!stquant_megatron/report.py", *_CHECKPOINT_IO,
                "!stquant_megatron/megatron/memory.py", "benchmarks/quality.py", *_TRITON],  # fmt: skip
    # Megatron-LM's own pretrain_*.py under the patch (tests/test_megatron_lm.py writes the rows)
    "megatron_lm": ["stquant_megatron/**", "!stquant_megatron/report.py", "patches/**", "tests/test_megatron_lm.py",
                    *_TRITON],  # fmt: skip
    # checkpoint bytes, save/load time and memory through Megatron-LM's pretrain_gpt.py
    "checkpoint": ["stquant_megatron/**", "!stquant_megatron/report.py", "patches/**", "benchmarks/checkpoint_size.py",
                   *_TRITON],  # fmt: skip
    # the scheduler's cost benchmark
    "scheduler_cost": _OPTIMIZER + ["benchmarks/scheduler_cost.py"],
    # the ahead-of-time compile matrix of the Triton kernels
    "gpu_compile": ["stquant_megatron/kernels/**", "stquant_megatron/formats/**", "stquant_megatron/config.py",
                    "benchmarks/gpu_compile.py"],  # fmt: skip
}


# A "~path" entry hashes that file less its spec region: the lines from SPEC_BEGIN to SPEC_END, both
# included. The region holds only the compared configurations (names, labels, config dicts); a
# benchmark that uses it records each run's configuration and reuses a run only for an equal one, so
# adding or relabelling a configuration leaves the other runs' code unchanged.
SPEC_BEGIN = "# provenance: specs begin"
SPEC_END = "# provenance: specs end"


def strip_spec_region(data: bytes, where: str = "file") -> bytes:
    """``data`` less its spec region (unchanged without one); ValueError on unpaired markers."""
    lines = data.splitlines(keepends=True)
    begins = [i for i, ln in enumerate(lines) if ln.strip() == SPEC_BEGIN.encode()]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == SPEC_END.encode()]
    if not begins and not ends:
        return data
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(f"{where}: expected one '{SPEC_BEGIN}' line followed by one '{SPEC_END}' line; "
                         f"found begins at lines {[i + 1 for i in begins]}, ends at {[i + 1 for i in ends]}")
    return b"".join(lines[: begins[0]] + lines[ends[0] + 1 :])


def _hashed(name: str, rel: str, data: bytes) -> bytes:
    """The bytes of ``rel`` that dependency set ``name`` hashes (a "~" entry: less its spec region)."""
    return strip_spec_region(data, rel) if "~" + rel in DEPS[name] else data


def _match(path: str, pattern: str) -> bool:
    if pattern.endswith("/**"):
        return path.startswith(pattern[:-2])
    return fnmatch.fnmatchcase(path, pattern)


def _select(name: str, paths) -> list[str]:
    """The paths of dependency set ``name`` among ``paths``: Python sources and shell scripts under the
    listed folders and the listed files, less the ``!`` exclusions."""
    pats = DEPS[name]
    inc = [p.lstrip("~") for p in pats if not p.startswith("!")]
    exc = [p[1:] for p in pats if p.startswith("!")]
    out = set()
    for p in paths:
        if "__pycache__" in p:
            continue
        for pat in inc:
            if pat.endswith("/**") and p.startswith(pat[:-2]) and p.endswith((".py", ".sh", ".pth")) or p == pat:
                out.add(p)
    return sorted(p for p in out if not any(_match(p, e) for e in exc))


def dep_files(name: str, root: str = ROOT) -> list[str]:
    """The files of dependency set ``name`` in the working tree at ``root`` (relative paths, sorted):
    the files git tracks there (untracked files are not part of any commit a reader can check out),
    or every file when ``root`` is not a git checkout."""
    try:
        tracked = subprocess.run(["git", "-C", root, "ls-files"], capture_output=True, text=True, check=True).stdout
        return _select(name, [p for p in tracked.splitlines() if os.path.isfile(os.path.join(root, p))])
    except (OSError, subprocess.CalledProcessError):
        pass
    found = []
    for pat in DEPS[name]:
        pat = pat.lstrip("~")
        base = pat[:-3] if pat.endswith("/**") else pat
        full = os.path.join(root, base)
        if pat.startswith("!"):
            continue
        if os.path.isfile(full):
            found.append(base)
        for d, dirs, files in os.walk(full) if os.path.isdir(full) else ():
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            found += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for f in files]
    return _select(name, found)


def _digest(items) -> str:
    h = hashlib.sha256()
    for rel, data in items:
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:16]


def code_hash(name: str, root: str = ROOT) -> str:
    """SHA-256 (first 16 hex digits) over the path and bytes of every file of dependency set ``name``."""
    def read(rel):
        with open(os.path.join(root, rel), "rb") as f:
            return _hashed(name, rel, f.read())

    return _digest((rel, read(rel)) for rel in dep_files(name, root))


def code_hash_at(name: str, commit: str, root: str = ROOT) -> str | None:
    """The same hash for the files as they were at ``commit`` (None if git or the commit is missing)."""
    try:
        git = lambda *a, **k: subprocess.run(["git", "-C", root, *a], capture_output=True, check=True, **k).stdout  # noqa: E731
        paths = git("ls-tree", "-r", "--name-only", commit, text=True).splitlines()
        return _digest((rel, _hashed(name, rel, git("show", f"{commit}:{rel}"))) for rel in _select(name, paths))
    except (OSError, subprocess.CalledProcessError):
        return None


def code_hashes(root: str = ROOT) -> dict[str, str]:
    return {name: code_hash(name, root) for name in DEPS}


def git_commit(root: str = ROOT) -> str | None:
    """The checkout's commit (short), ``+dirty`` with uncommitted changes to tracked files."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, check=True).stdout  # noqa: E731
        return run("rev-parse", "--short", "HEAD").strip() + ("+dirty" if run("status", "--porcelain", "-uno").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001  (a broken torch install still gets a hardware line)
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}; {platform.system()} {platform.release()}"


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "megatron-core", "bitsandbytes", "torchao", "scikit-learn", "stquant-megatron"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that reproduces a run of ``script`` (a path) with ``argv`` (default sys.argv[1:])."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join(["python", os.path.relpath(os.path.abspath(script), ROOT), *args])


def provenance(script: str, argv: list[str] | None = None, deps: tuple[str, ...] = ()) -> dict:
    """What a results file records about how it was made (``deps``: the dependency sets whose code
    hashes it stores; the renderer judges staleness from them). Commit and hashes are those of the
    code when this module was first imported (the process's start), not of edits made during a run."""
    return dict(commit=STARTED["commit"], command=command(script, argv), hardware=hardware(), versions=versions(),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), started=STARTED["date"],
                code={d: STARTED["code"][d] for d in deps})  # fmt: skip


def freshness(recorded: dict | None, deps: tuple[str, ...] | list[str], root: str = ROOT) -> tuple[bool | None, list[str]]:
    """(fresh, changed sets): fresh is True when every dependency set's recorded hash equals the
    current one, False when one differs, None when the file recorded no hash for one of them."""
    recorded = recorded or {}
    missing = [d for d in deps if d not in recorded]
    changed = [d for d in deps if d in recorded and recorded[d] != code_hash(d, root)]
    if changed:
        return False, changed
    return (None if missing else True), missing


# the code this process runs: read once, when a benchmark imports this module at its start
STARTED = dict(commit=git_commit(), code=code_hashes(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def main() -> int:
    for name, h in code_hashes().items():
        print(f"{name:16s} {h}  ({len(dep_files(name))} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
