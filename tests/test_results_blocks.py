"""Published numbers: every generated block of the README and docs equals what its results file
generates now (``benchmarks/results_table.py --check``), and each block's staleness note is computed
from the code hashes its results file recorded (``benchmarks/provenance.py``), not typed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import provenance  # noqa: E402
import results_table  # noqa: E402


def test_generated_blocks_match_their_results_files():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results_table.py"), "--check"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # every block the registry knows is generated from a file that exists (none silently skipped)
    assert len(results_table.generated_blocks()) == len(results_table.BLOCKS)


def _copy_published(tmp: Path) -> None:
    for doc in {b[2] for b in results_table.BLOCKS}:
        (tmp / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp / doc)
    shutil.copytree(ROOT / "benchmarks" / "results", tmp / "benchmarks" / "results")


def test_check_fails_on_a_hand_edited_number_and_on_a_changed_results_file(tmp_path):
    _copy_published(tmp_path)
    assert results_table.check(str(tmp_path)) == []
    readme = (tmp_path / "README.md").read_text()
    start = readme.index(results_table.STEP_START)
    row = readme.index("| **STQuantAdamW** |", start)
    cell_end = readme.index(" |", row + len("| **STQuantAdamW** | 8 | "))
    edited = readme[:cell_end] + "9" + readme[cell_end:]  # one digit more in one number
    (tmp_path / "README.md").write_text(edited)
    assert results_table.check(str(tmp_path)) == [f"README.md: {results_table.STEP_START}"]
    (tmp_path / "README.md").write_text(readme)
    cost = tmp_path / results_table.COST_FILE
    d = json.loads(cost.read_text())
    d["measured"]["wall"]["plain_ms"] *= 1.5
    cost.write_text(json.dumps(d))
    assert results_table.check(str(tmp_path)) == [f"{results_table.COST_DOC}: {results_table.COST_START}"]


def test_staleness_is_computed_from_the_recorded_code_hash():
    now = provenance.code_hash("step")
    fresh = results_table.provenance_line({"commit": "abc1234", "code": {"step": now}}, ("step",))
    stale = results_table.provenance_line({"commit": "abc1234", "code": {"step": "0" * 16}}, ("step",))
    unknown = results_table.provenance_line({"commit": "abc1234"}, ("step",))
    assert "is unchanged since" in fresh and "stale" not in fresh
    assert "**stale**" in stale and "`step`" in stale
    assert "not known to describe the current code" in unknown


def test_code_hash_follows_the_dependency_files_and_ignores_the_others(tmp_path):
    for rel in ("stquant_megatron/optim.py", "stquant_megatron/kernels/torch_adam.py",
                "stquant_megatron/testing/gpt.py", "benchmarks/step.py", "benchmarks/quality.py"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    assert provenance.dep_files("step", str(tmp_path)) == [  # not a git checkout: the files on disk
        "benchmarks/step.py", "stquant_megatron/kernels/torch_adam.py", "stquant_megatron/optim.py"]
    h0 = provenance.code_hash("step", str(tmp_path))
    (tmp_path / "stquant_megatron/testing/gpt.py").write_text("# changed\n")  # the test harness: not a dependency
    (tmp_path / "benchmarks/quality.py").write_text("# changed\n")
    assert provenance.code_hash("step", str(tmp_path)) == h0
    (tmp_path / "stquant_megatron/kernels/torch_adam.py").write_text("# changed\n")
    h1 = provenance.code_hash("step", str(tmp_path))
    assert h1 != h0
    os.rename(tmp_path / "stquant_megatron/optim.py", tmp_path / "stquant_megatron/optim2.py")  # a rename counts
    assert provenance.code_hash("step", str(tmp_path)) != h1


def test_frontier_hash_ignores_its_spec_region_and_nothing_else(tmp_path):
    """Adding a configuration to the frontier's spec list leaves the other runs fresh; any other edit
    of the same file (the model, the loop, the run log's matching) makes them stale."""
    body = "import torch\n\n{}\ndef specs():\n    return [1]\n{}\n\n\ndef run():\n    return 2\n"
    path = tmp_path / "benchmarks/frontier.py"
    path.parent.mkdir(parents=True)
    path.write_text(body.format(provenance.SPEC_BEGIN, provenance.SPEC_END))
    h0 = provenance.code_hash("frontier-peers", str(tmp_path))
    path.write_text(body.format(provenance.SPEC_BEGIN, provenance.SPEC_END).replace("[1]", "[1, 'new spec']"))
    assert provenance.code_hash("frontier-peers", str(tmp_path)) == h0
    path.write_text(body.format(provenance.SPEC_BEGIN, provenance.SPEC_END).replace("return 2", "return 3"))
    assert provenance.code_hash("frontier-peers", str(tmp_path)) != h0
    path.write_text(body.format(provenance.SPEC_BEGIN, "# no end marker"))
    with pytest.raises(ValueError, match="benchmarks/frontier.py.*specs end"):
        provenance.code_hash("frontier-peers", str(tmp_path))


def test_the_spec_regions_hold_only_the_spec_functions():
    """What the hash leaves out: exactly one function per file, the configurations it lists."""
    import ast

    for rel, fn in (("benchmarks/frontier.py", "specs"), ("benchmarks/quality.py", "optimizer_specs")):
        data = (ROOT / rel).read_bytes()
        kept = provenance.strip_spec_region(data)
        assert len(kept) < len(data) and kept.count(b"def ") > 3
        start = data.index(provenance.SPEC_BEGIN.encode())
        inner = data[start:].split(b"\n", 1)[1].split(provenance.SPEC_END.encode())[0].decode()
        tree = ast.parse(inner)
        assert [type(n).__name__ for n in tree.body] == ["FunctionDef"] and tree.body[0].name == fn, rel


@pytest.mark.parametrize("name", sorted(provenance.DEPS))
def test_code_hash_at_head_equals_the_working_tree_for_committed_files(name):
    """The hash recomputed from git's objects (how runs recorded before hashes existed get theirs)
    equals the working tree's wherever the dependency files are unmodified."""
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *provenance.dep_files(name)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    at_head = provenance.code_hash_at(name, "HEAD")
    assert at_head is not None
    assert (at_head == provenance.code_hash(name)) == (not dirty.strip())
