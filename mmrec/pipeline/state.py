"""Whether a step is up to date (make/DVC semantics), decided from content hashes only.

After a step runs, ``<run_dir>/pipeline.json`` records, for that step: the hash of its command line and of
its config files' contents; the stage folder it wrote and the hash of that folder's ``manifest.json``; and
the hash of the ``manifest.json`` of every stage folder it read (the inputs its manifest lists, and the
model folder a ``test`` evaluated). A step is up to date while all of these still hold and the files its
manifest lists as inputs still have the recorded content (this is how a changed raw file reaches
``prepare``). Every run writes a new manifest (it records when it was written), so a re-run stage makes
every step that read it stale: changes travel downstream in pipeline order, and nothing else re-runs.

The record sits beside the stage folders rather than inside them: a stage folder stays exactly what its
stage wrote, and a folder rewritten by hand (another config, an interrupted pipeline) no longer matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmrec.artifacts.manifest import MANIFEST, file_sha256
from mmrec.artifacts.stage_output import atomic_file
from mmrec.pipeline.steps import Step

STATE_FILE = "pipeline.json"


@dataclass(frozen=True)
class Record:
    """What a finished step is checked against the next time the pipeline runs."""

    command: str
    folder: str
    manifest_sha256: str
    reads: dict[str, str]


def command_hash(step: Step) -> str:
    """Hash of the step's command line and of the contents of its config files."""
    digest = hashlib.sha256(json.dumps(step.argv).encode())
    for path in step.configs:
        digest.update(f"\0{path}\0{file_sha256(path)}".encode())
    return digest.hexdigest()


def manifests(run_dir: Path) -> dict[str, str]:
    """``{stage folder (relative to run_dir): sha256 of its manifest.json}``; ``test/<model>-<split>``
    folders sit one level deeper."""
    found = [*run_dir.glob(f"*/{MANIFEST}"), *run_dir.glob(f"*/*/{MANIFEST}")]
    return {path.parent.relative_to(run_dir).as_posix(): file_sha256(path) for path in found}


class PipelineState:
    """The records of ``<run_dir>/pipeline.json``, rewritten atomically after each step that ran."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / STATE_FILE
        self.records = self._load()

    def _load(self) -> dict[str, Record]:
        """The stored records; an unreadable file counts as none (every step then runs once more)."""
        try:
            return {name: Record(**entry) for name, entry in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def stale(self, step: Step, current: dict[str, str]) -> str | None:
        """Why ``step`` must run, or None when it is up to date; ``current`` is :func:`manifests` now."""
        record = self.records.get(step.name)
        if record is None:
            return "not run by the pipeline yet"
        if record.command != command_hash(step):
            return "its command line or config changed"
        if current.get(record.folder) != record.manifest_sha256:
            return f"{record.folder}/ was rewritten or removed"
        changed = [folder for folder, sha in record.reads.items() if current.get(folder) != sha]
        if changed:
            return f"{', '.join(changed)} changed"
        moved = changed_inputs(self.run_dir / record.folder)
        return f"input {moved} changed" if moved else None

    def record(self, step: Step, before: dict[str, str]) -> None:
        """Record a step that just ran; ``before`` is :func:`manifests` from just before it ran."""
        after = manifests(self.run_dir)
        written = sorted(folder for folder, sha in after.items() if before.get(folder) != sha)
        if len(written) == 1:
            folder = written[0]
            reads = {name: after[name] for name in read_folders(self.run_dir, folder) if name in after}
            self.records[step.name] = Record(command_hash(step), folder, after[folder], reads)
        else:  # no stage folder (or several) to be up to date with: the step runs again next time
            self.records.pop(step.name, None)
        with atomic_file(self.path) as partial:
            partial.write_text(json.dumps({name: asdict(r) for name, r in self.records.items()}, indent=2, sort_keys=True) + "\n")


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _input_paths(folder: Path) -> list[tuple[Path, str | None]]:
    """The inputs a stage folder records: its manifest's files (with their hashes) and, for ``test``, the
    checkpoint named in ``metrics.json`` (a model folder, which the manifest does not list)."""
    inputs = _manifest(folder).get("inputs")
    paths = [(Path(entry["path"]), entry.get("sha256")) for entry in (inputs or {}).values()
             if isinstance(entry, dict) and isinstance(entry.get("path"), str)]
    try:
        checkpoint = json.loads((folder / "metrics.json").read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        checkpoint = None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("path"), str):
        paths.append((Path(checkpoint["path"]), None))
    return paths


def read_folders(run_dir: Path, folder: str) -> list[str]:
    """The stage folders of ``run_dir`` that ``folder``'s stage read: those holding one of its inputs."""
    root = run_dir.resolve()
    found = set()
    for path, _ in _input_paths(run_dir / folder):
        for parent in [path, *path.parents]:
            if parent == root or root not in parent.parents:
                break
            if (parent / MANIFEST).is_file():
                found.add(parent.relative_to(root).as_posix())
                break
    found.discard(folder)
    return sorted(found)


def changed_inputs(folder: Path) -> str | None:
    """The first input file whose content differs from the hash the folder's manifest recorded, if any."""
    for path, sha in _input_paths(folder):
        if sha is not None and (not path.is_file() or file_sha256(path) != sha):
            return str(path)
    return None
