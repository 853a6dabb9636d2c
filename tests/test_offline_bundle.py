"""``bench/offline_bundle.py``: files cut into parts on one side arrive whole, and only whole, on the other.

The GPU figures depend on it: a session whose GGUF arrived truncated, or whose run folders mixed two packings,
would train on something else than what ``bench/RESULTS.md`` names. The script runs as the far side runs it, one
transfer (one part folder) at a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "offline_bundle.py"


def bundle(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=False, capture_output=True, text=True)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """A folder of several files, one incompressible file, and a small file."""
    folder = tmp_path / "src" / "inputs"
    (folder / "prepare").mkdir(parents=True)
    (folder / "prepare" / "manifest.json").write_text('{"stage": "prepare"}')
    (folder / "prepare" / "items.bin").write_bytes(bytes(range(256)) * 40)
    weights = tmp_path / "src" / "model.gguf"
    weights.write_bytes(os.urandom(30_000))
    readme = tmp_path / "src" / "README.md"
    readme.write_text("raw data\n")
    return {"folder": folder, "weights": weights, "readme": readme}


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def transfer(part: Path, far: Path) -> Path:
    """One transfer: only this part folder is on the far side's source path, as a carried path is."""
    arrived = far / "carried"
    shutil.rmtree(arrived, ignore_errors=True)
    shutil.copytree(part, arrived / part.name)
    return arrived


def test_an_archive_lands_whole_once_its_last_part_arrives(tmp_path: Path, sources: dict[str, Path]) -> None:
    dest, target = tmp_path / "bundle", tmp_path / "far" / "root"
    packed = bundle("pack", dest, "--part_mb", 0.01, "--archive", "models", f"text={sources['folder']}",
                    f"smollm2.gguf={sources['weights']}", "--archive", "start", sources["readme"])
    assert packed.returncode == 0, packed.stderr
    parts = sorted(dest.glob("models-*of*"), key=lambda p: int(p.name.split("-")[1].split("of")[0]))
    assert len(parts) >= 3 and sorted(dest.glob("start-*")) == [dest / "start-1of1"]

    for part in reversed(parts[1:]):  # parts may come in any order; the archive waits for all of them
        shown = bundle("unpack", transfer(part, tmp_path / "far"), target)
        assert shown.returncode == 0 and shown.stdout.startswith("models: waits for parts [1")
        assert not (target / "text").exists() and not (target / "smollm2.gguf").exists()
    shown = bundle("unpack", transfer(parts[0], tmp_path / "far"), target)
    assert shown.returncode == 0, shown.stderr
    assert "models: unpacked text, smollm2.gguf" in shown.stdout
    assert tree(target / "text") == tree(sources["folder"])
    assert (target / "smollm2.gguf").read_bytes() == sources["weights"].read_bytes()
    assert not (target / ".parts" / "models").exists()

    shown = bundle("unpack", transfer(dest / "start-1of1", tmp_path / "far"), target)
    assert shown.returncode == 0 and (target / "README.md").read_text() == "raw data\n"

    (target / "README.md").write_text("read by a job")  # an earlier transfer's part still there: left alone
    shown = bundle("unpack", transfer(dest / "start-1of1", tmp_path / "far"), target)
    assert shown.returncode == 0 and shown.stdout == "\n" and (target / "README.md").read_text() == "read by a job"


def test_a_corrupt_part_is_refused_and_nothing_lands(tmp_path: Path, sources: dict[str, Path]) -> None:
    dest, target = tmp_path / "bundle", tmp_path / "far" / "root"
    assert bundle("pack", dest, "--part_mb", 0.01, "--archive", "models", sources["weights"]).returncode == 0
    parts = sorted(dest.glob("models-*of*"))
    first = parts[0] / "part"
    first.write_bytes(b"\0" + first.read_bytes()[1:])
    for part in parts:
        shown = bundle("unpack", transfer(part, tmp_path / "far"), target)
    assert shown.returncode == 2
    assert shown.stderr.count("\n") == 1 and "archive models: its parts do not join to the SHA-256" in shown.stderr
    assert not (target / "model.gguf").exists() and not (target / ".parts" / "models").exists()


def test_parts_of_an_earlier_packing_are_dropped(tmp_path: Path, sources: dict[str, Path]) -> None:
    dest, target = tmp_path / "bundle", tmp_path / "far" / "root"
    assert bundle("pack", dest, "--part_mb", 0.01, "--archive", "models", sources["weights"]).returncode == 0
    bundle("unpack", transfer(min(dest.glob("models-*")), tmp_path / "far"), target)
    sources["weights"].write_bytes(b"packed again")
    assert bundle("pack", dest, "--archive", "models", sources["weights"]).returncode == 0
    shown = bundle("unpack", transfer(dest / "models-1of1", tmp_path / "far"), target)
    assert shown.returncode == 0, shown.stderr
    assert (target / "model.gguf").read_bytes() == b"packed again"


@pytest.mark.parametrize("args, expected", [
    (["--archive", "models"], "--archive models: expected at least one entry after the name"),
    (["--archive", "models", "nowhere/x"], "--archive entry 'nowhere/x': nowhere/x does not exist"),
    (["--part_mb", "0", "--archive", "m", "."], "--part_mb 0.0: expected a positive size in MiB"),
])
def test_bad_pack_options_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    shown = bundle("pack", tmp_path / "bundle", *args)
    assert shown.returncode == 2 and shown.stderr.strip() == f"offline_bundle: error: {expected}"
    assert not (tmp_path / "bundle").exists()
