"""Carry files to a machine that cannot reach the network, in parts no larger than a per-transfer limit.

Our GPU figures come from lent machines that reach no package registry or hub and take at most some 64 MiB a
transfer, while a session needs wheels, a GGUF backbone, a text encoder, the raw data and, at times, an earlier
session's run folders (some 200 MB in all). ``pack`` writes each archive as numbered part folders, each one
transfer, and ``unpack`` on the far side collects the parts of as many transfers as it takes: once an archive's
parts are all there it checks the whole against its SHA-256 and moves the entries into place one by one, in the
order they were packed. A reader that waits for a file (``bench/gpu_session.sh`` waits for its GGUF) therefore never
sees half of one, and a job can start on the first archive while the later ones are still on their way.

    python bench/offline_bundle.py pack DEST --archive start wheels=W data=D --archive models text=T smollm2.gguf=G
    python bench/offline_bundle.py unpack DEST TARGET     # on the far side, after each transfer

``DEST/NAME-IofN/`` holds one part and the archive's manifest. Standard library only: the far side may lack
everything else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"
PART = "part"
CHUNK = 1 << 20


class BundleError(Exception):
    """A problem the user can fix, reported as one line and exit code 2."""


def parse_entry(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` (``PATH`` alone: its own name), the name the entry gets in the target folder."""
    name, sep, path = text.partition("=")
    source = Path(path if sep else name)
    name = name if sep else source.name
    if not name or "/" in name or name in (".", ".."):
        raise BundleError(f"--archive entry {text!r}: expected NAME=PATH with a plain file or folder name")
    if not source.exists():
        raise BundleError(f"--archive entry {text!r}: {source} does not exist")
    return name, source


def pack(dest: Path, archive: str, entries: list[tuple[str, Path]], part_bytes: int) -> list[Path]:
    """Write ``archive``'s entries as a gzip tarball cut into ``DEST/ARCHIVE-IofN`` part folders."""
    if len({name for name, _ in entries}) != len(entries):
        raise BundleError(f"--archive {archive}: two entries have the same name")
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob(f"{archive}-*of*"):
        shutil.rmtree(stale)
    tarball = dest / f".{archive}.tar.gz"
    # level 1: the bulk (weights, embeddings) barely compresses; the text data does at any level
    with tarfile.open(tarball, "w:gz", compresslevel=1) as tar:
        for name, source in entries:
            tar.add(source, arcname=name)
    count = max(1, math.ceil(tarball.stat().st_size / part_bytes))
    digest = hashlib.sha256()
    folders = []
    with tarball.open("rb") as whole:
        for index in range(count):
            data = whole.read(part_bytes)
            digest.update(data)
            folder = dest / f"{archive}-{index + 1}of{count}"
            folder.mkdir()
            (folder / PART).write_bytes(data)
            folders.append(folder)
    tarball.unlink()
    manifest = {"archive": archive, "parts": count, "sha256": digest.hexdigest(),
                "entries": [name for name, _ in entries]}
    for folder in folders:
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folders


def collect(source: Path, target: Path) -> list[str]:
    """Copy the parts under ``source`` into ``target/.parts``; unpack each archive now complete.

    Returns one line per archive still open or unpacked now: which parts it waits for, or what it unpacked. A part
    of an archive already unpacked, the same packing, is ignored: the machine may keep an earlier transfer's files.
    """
    store = target / ".parts"
    store.mkdir(parents=True, exist_ok=True)
    for manifest_path in sorted(source.glob(f"*-*of*/{MANIFEST}")):
        folder = manifest_path.parent
        manifest = json.loads(manifest_path.read_text())
        mark = unpacked_mark(store, manifest["archive"])
        if mark.exists() and mark.read_text() == manifest["sha256"]:
            continue  # a part left over from an earlier transfer: unpacking again would pull files from under readers
        archive_store = store / manifest["archive"]
        stored = archive_store / MANIFEST
        if stored.exists() and json.loads(stored.read_text())["sha256"] != manifest["sha256"]:
            shutil.rmtree(archive_store)  # the archive was packed again since: its older parts do not belong
        archive_store.mkdir(exist_ok=True)
        shutil.copyfile(manifest_path, archive_store / MANIFEST)
        index = folder.name.rsplit("-", 1)[1].split("of")[0]
        shutil.copyfile(folder / PART, archive_store / f"{PART}.{int(index):04d}")
    lines = []
    for archive_store in sorted(path for path in store.iterdir() if path.is_dir()):
        manifest = json.loads((archive_store / MANIFEST).read_text())
        missing = [i for i in range(1, manifest["parts"] + 1) if not (archive_store / f"{PART}.{i:04d}").exists()]
        if missing:
            lines.append(f"{manifest['archive']}: waits for parts {missing} of {manifest['parts']}")
            continue
        unpack(archive_store, manifest, target)
        shutil.rmtree(archive_store)
        unpacked_mark(store, manifest["archive"]).write_text(manifest["sha256"])
        lines.append(f"{manifest['archive']}: unpacked {', '.join(manifest['entries'])} into {target}")
    return lines


def unpacked_mark(store: Path, archive: str) -> Path:
    """The file that holds the SHA-256 of ``archive`` as last unpacked."""
    return store / f"{archive}.unpacked"


def unpack(archive_store: Path, manifest: dict, target: Path) -> None:
    """Join the parts, check the SHA-256, then move each entry into ``target`` in packing order."""
    parts = [archive_store / f"{PART}.{i:04d}" for i in range(1, manifest["parts"] + 1)]
    digest = hashlib.sha256()
    joined = archive_store / "joined.tar.gz"
    with joined.open("wb") as whole:
        for part in parts:
            with part.open("rb") as piece:
                while chunk := piece.read(CHUNK):
                    digest.update(chunk)
                    whole.write(chunk)
    if digest.hexdigest() != manifest["sha256"]:
        shutil.rmtree(archive_store)
        raise BundleError(f"archive {manifest['archive']}: its parts do not join to the SHA-256 packed "
                          f"({manifest['sha256'][:12]}...); its parts are discarded, transfer them again")
    staging = archive_store / "staging"
    with tarfile.open(joined, "r:gz") as tar:
        tar.extractall(staging, filter="data")
    for name in manifest["entries"]:
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        (staging / name).replace(destination)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser("pack", help="write archives as part folders under DEST")
    pack_parser.add_argument("dest", type=Path)
    pack_parser.add_argument("--archive", nargs="+", action="append", required=True, metavar="NAME [NAME=]PATH",
                             help="an archive's name, then its entries (repeatable)")
    pack_parser.add_argument("--part_mb", type=float, default=55.0,
                             help="largest part in MiB (default 55: a 64 MiB transfer with room for the repository)")
    unpack_parser = commands.add_parser("unpack", help="collect the parts under SOURCE; unpack complete archives")
    unpack_parser.add_argument("source", type=Path)
    unpack_parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            if args.part_mb <= 0:
                raise BundleError(f"--part_mb {args.part_mb}: expected a positive size in MiB")
            for name, *entries in args.archive:
                if not entries:
                    raise BundleError(f"--archive {name}: expected at least one entry after the name")
                folders = pack(args.dest, name, [parse_entry(entry) for entry in entries],
                               max(1, int(args.part_mb * CHUNK)))
                print(f"{name}: {len(folders)} part(s): {' '.join(folder.name for folder in folders)}")
        else:
            if not args.source.is_dir():
                raise BundleError(f"{args.source}: expected the folder holding the part folders")
            print("\n".join(collect(args.source, args.target)))
    except BundleError as error:
        print(f"offline_bundle: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
