"""Run one step as its own ``mmrec <stage>`` process.

A child process per stage, not ``mmrec.cli.main`` in this one, because: Lightning's DDP launcher starts
the other ranks by re-executing the current command line, which must therefore be the stage's own (in
process it would be ``mmrec pipeline``, and each rank would run the whole pipeline); a stage's GPU memory,
compiled graphs, seeds and global Lightning/warnings state end with it, so every stage runs exactly as
its command does by hand; and a crash (out of memory, a segfault) ends one stage, not the driver.

On Linux the child is a fork of this process after :func:`preload` has imported the stage's module (torch,
Lightning, transformers and mmrec's own, once for all stages), so a stage starts without paying those
imports each time: some 10-15 s a stage on a GPU host, where importing a CUDA build of torch is slow, two
minutes over the Beauty pipeline. Nothing else is shared: the driver never initialises CUDA, seeds a
generator or builds a model, and the child presents itself as ``python -m mmrec.cli <stage> ...`` (its
``sys.argv`` and ``__main__``), which is the command Lightning's DDP launcher re-executes for the other
ranks. Elsewhere (no ``fork``), with ``--verbose`` (a fresh interpreter, no filter the driver installed),
once CUDA is initialised here, or where a throwaway fork finds it cannot use the GPUs, each stage starts a
new interpreter instead.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import IO

from mmrec.logs import VERBOSE_ENV


@dataclass(frozen=True)
class Outcome:
    """How a stage process ended: its exit code and the last line it wrote to stderr (its error, if any)."""

    returncode: int
    last_error_line: str


def preload(stage: str) -> bool:
    """Import the module of ``stage`` (an ``mmrec.cli.STAGES`` name) here, where every later fork finds it
    loaded; False where it cannot be imported (the stage's own process then reports why). Importing touches
    no device: CUDA stays uninitialised, so a fork may use it."""
    from mmrec.cli import STAGES

    try:
        importlib.import_module(STAGES[stage][0])
    except (ImportError, KeyError):
        return False
    return True


def forks() -> bool:
    """Whether stages start as forks of this process: on Linux, while CUDA is not initialised here (a forked
    child cannot use a CUDA context its parent created)."""
    torch = sys.modules.get("torch")
    return sys.platform.startswith("linux") and not (torch is not None and torch.cuda.is_initialized())


@functools.cache
def forks_reach_cuda() -> bool:
    """Whether a fork of this process can use the GPUs, asked once of a throwaway fork after the first stage
    module is imported (True where there is no GPU). Importing should leave the CUDA driver untouched, but
    one library calling the CUDA runtime at import would leave every forked stage with "initialization error";
    then each stage gets a fresh interpreter instead, and the pipeline only loses the saved imports."""
    torch = sys.modules.get("torch")
    if torch is None or torch.cuda.device_count() == 0:  # NVML's count: it does not initialise CUDA here
        return True
    probe = multiprocessing.get_context("fork").Process(target=_touch_cuda, name="mmrec cuda probe")
    probe.start()
    probe.join()
    return probe.exitcode == 0


def _touch_cuda() -> None:
    import torch

    try:
        torch.zeros(1, device="cuda")
    except Exception:  # noqa: BLE001 (any failure means the same: no CUDA in a fork)
        sys.exit(1)


def run_stage(argv: list[str], verbose: bool, fork: bool = True) -> Outcome:
    """Run ``mmrec <argv>``; its stdout passes straight through, its stderr is echoed except for the last
    line when it fails (the pipeline reports that line as its own one-line error). ``fork`` False: a fresh
    interpreter even where a fork could start it."""
    if verbose or not fork or not forks() or not preload(argv[0]) or not forks_reach_cuda():
        return _run_interpreter(argv, verbose)
    return _run_fork(argv)


def _run_interpreter(argv: list[str], verbose: bool) -> Outcome:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # interleave the stage's lines as they come when piped
    if verbose:
        env[VERBOSE_ENV] = "1"
    process = subprocess.Popen([sys.executable, "-m", "mmrec.cli", *argv], stderr=subprocess.PIPE, env=env)
    assert process.stderr is not None
    held = _relay(process.stderr)
    returncode = process.wait()
    return _outcome(returncode, held)


def _run_fork(argv: list[str]) -> Outcome:
    read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child would write this process's buffered lines a second time
    child = multiprocessing.get_context("fork").Process(target=_stage_main, args=(argv, read_fd, write_fd),
                                                       name=f"mmrec {argv[0]}")
    child.start()
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as stderr:
        held = _relay(stderr)
    child.join()
    assert child.exitcode is not None
    return _outcome(child.exitcode, held)


def _stage_main(argv: list[str], read_fd: int, write_fd: int) -> None:
    """The forked child: stderr into the driver's pipe, stdout to file descriptor 1 (what a process of its own
    writes to, even where this interpreter's ``sys.stdout`` was replaced), then the stage as ``mmrec`` runs it."""
    os.close(read_fd)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own stream)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    cli = importlib.import_module("mmrec.cli")
    sys.modules["__main__"], sys.argv = cli, [cli.__file__, *argv]
    sys.exit(cli.main(argv))


def _relay(stderr: IO[bytes]) -> bytes:
    """Echo a stage's stderr as it comes, holding back one line (a failure's last line is not printed
    twice); returns that line."""
    held = b""
    for line in stderr:
        if held:
            _echo(held)
        held = line
    return held


def _outcome(returncode: int, held: bytes) -> Outcome:
    if returncode == 0 and held:
        _echo(held)
    return Outcome(returncode, held.decode(errors="replace").strip())


def _echo(line: bytes) -> None:
    sys.stderr.buffer.write(line)
    sys.stderr.flush()
