"""Run one step as its own ``mmrec <stage>`` process.

A child process per stage, not ``mmrec.cli.main`` in this one, because: Lightning's DDP launcher starts
the other ranks by re-executing the current command line, which must therefore be the stage's own (in
process it would be ``mmrec pipeline``, and each rank would run the whole pipeline); a stage's GPU memory,
compiled graphs, seeds and global Lightning/warnings state end with it, so every stage runs exactly as
its command does by hand; and a crash (out of memory, a segfault) ends one stage, not the driver.

On Linux the child comes from a fork server (the standard library's ``forkserver``): a fresh interpreter,
started once, imports the stage modules (torch, Lightning, transformers and mmrec's own) and forks each
stage from there, so a stage starts without paying those imports each time: some 10-15 s a stage on a GPU
host, where importing a CUDA build of torch is slow, two minutes over the Beauty pipeline. Not a fork of
this process: a process that has run OpenMP work (a test session, a notebook) cannot be forked safely, and
the server has run nothing but imports, never a device, a seed or a model. The child takes this process's
working directory, environment, stdout and stderr, and presents itself as ``python -m mmrec.cli <stage> ...``
(its ``sys.argv`` and ``__main__``), the command Lightning's DDP launcher re-executes for the other ranks.
Elsewhere (no ``forkserver``), with ``--verbose`` (a fresh interpreter, no filter installed beforehand),
where a throwaway child finds it cannot use the GPUs, or where the server cannot start a child (it failed to
start, or died), each stage starts a new interpreter instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import multiprocessing
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import IO

from mmrec.logs import VERBOSE_ENV


@dataclass(frozen=True)
class Outcome:
    """How a stage process ended: its exit code and the last line it wrote to stderr (its error, if any)."""

    returncode: int
    last_error_line: str


def forks() -> bool:
    """Whether stages start from the fork server: on Linux (elsewhere ``fork`` is missing or unsafe)."""
    return sys.platform.startswith("linux")


@functools.cache
def fork_server() -> multiprocessing.context.BaseContext:
    """The ``forkserver`` context whose server imports every stage's module once, when the first stage starts."""
    from mmrec.cli import STAGES

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([module for module, _ in STAGES.values()])
    return context


@functools.cache
def forks_reach_cuda() -> bool:
    """Whether a child of the fork server can use the GPUs, asked once of a throwaway child (True where there is
    no GPU). Importing should leave the CUDA driver untouched, but one library calling the CUDA runtime at
    import would leave every forked stage with "initialization error"; then each stage gets a fresh
    interpreter instead, and the pipeline only loses the saved imports."""
    import torch

    if torch.cuda.device_count() == 0:  # NVML's count: it does not initialise CUDA here
        return True
    probe = fork_server().Process(target=_touch_cuda, name="mmrec cuda probe")
    try:
        with _no_main_module():
            probe.start()
    except (OSError, EOFError):  # no fork server (it could not start, or died importing): no forks at all
        return False
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
    interpreter even where the fork server could start it."""
    if verbose or not fork or not forks() or not forks_reach_cuda():
        return _run_interpreter(argv, verbose)
    outcome = _run_forked(argv)
    return _run_interpreter(argv, verbose) if outcome is None else outcome


def _run_interpreter(argv: list[str], verbose: bool) -> Outcome:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # interleave the stage's lines as they come when piped
    if verbose:
        env[VERBOSE_ENV] = "1"
    process = subprocess.Popen([sys.executable, "-m", "mmrec.cli", *argv], stderr=subprocess.PIPE, env=env)
    assert process.stderr is not None
    held = _relay(process.stderr)
    returncode = process.wait()
    return _outcome(returncode, held)


def _run_forked(argv: list[str]) -> Outcome | None:
    """The stage as a child of the fork server; None where the server cannot start it (nothing ran)."""
    read_fd, write_fd = os.pipe()
    # this process's stdout and the pipe's writing end, as a child process would inherit them, travel as
    # connections: the fork server passes their descriptors on
    stdout, stderr = Connection(os.dup(1), readable=False), Connection(write_fd, readable=False)
    sys.stdout.flush()
    child = fork_server().Process(target=_stage_main, args=(argv, dict(os.environ), stdout, stderr),
                                  name=f"mmrec {argv[0]}")
    with os.fdopen(read_fd, "rb") as lines:
        try:
            with _no_main_module():
                child.start()
        except (OSError, EOFError):
            return None
        finally:
            stdout.close()
            stderr.close()
        held = _relay(lines)
    child.join()
    assert child.exitcode is not None
    return _outcome(child.exitcode, held)


@contextlib.contextmanager
def _no_main_module() -> Iterator[None]:
    """Start a child without this process's ``__main__``: multiprocessing would have the child import it again
    (a script's path, ``pytest``'s, a missing ``<stdin>``), and the stage needs nothing from it."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _stage_main(argv: list[str], environ: dict[str, str], stdout: Connection, stderr: Connection) -> None:
    """The forked child: the driver's environment, stdout and stderr (its pipe), then the stage as ``mmrec``
    runs it."""
    os.environ.clear()
    os.environ.update(environ)
    for stream, fd in ((stdout, 1), (stderr, 2)):
        os.dup2(stream.fileno(), fd)
        stream.close()
    # the process's own streams for its whole life (no context to close them in), line-buffered
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    # the start method a fresh interpreter has (a forkserver child inherits "forkserver"): a stage's own
    # processes, such as its data loader's workers, start as they would under `python -m mmrec.cli`
    multiprocessing.set_start_method(None, force=True)
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
