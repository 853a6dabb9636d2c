"""Run one step as its own ``mmrec <stage>`` process.

A child process per stage, not ``mmrec.cli.main`` in this one, because: Lightning's DDP launcher starts
the other ranks by re-executing the current command line, which must therefore be the stage's own (in
process it would be ``mmrec pipeline``, and each rank would run the whole pipeline); a stage's GPU memory,
compiled graphs, seeds and global Lightning/warnings state end with it, so every stage runs exactly as
its command does by hand; and a crash (out of memory, a segfault) ends one stage, not the driver. The cost
is each stage's imports, a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from mmrec.logs import VERBOSE_ENV


@dataclass(frozen=True)
class Outcome:
    """How a stage process ended: its exit code and the last line it wrote to stderr (its error, if any)."""

    returncode: int
    last_error_line: str


def run_stage(argv: list[str], verbose: bool) -> Outcome:
    """Run ``mmrec <argv>``; its stdout passes straight through, its stderr is echoed except for the last
    line when it fails (the pipeline reports that line as its own one-line error)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # interleave the stage's lines as they come when piped
    if verbose:
        env[VERBOSE_ENV] = "1"
    process = subprocess.Popen([sys.executable, "-m", "mmrec.cli", *argv], stderr=subprocess.PIPE, env=env)
    assert process.stderr is not None
    held = b""
    for line in process.stderr:  # held back one line, so a failure's last line is not printed twice
        if held:
            _echo(held)
        held = line
    returncode = process.wait()
    if returncode == 0 and held:
        _echo(held)
    return Outcome(returncode, held.decode(errors="replace").strip())


def _echo(line: bytes) -> None:
    sys.stderr.buffer.write(line)
    sys.stderr.flush()
