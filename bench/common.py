"""Helpers shared by the benchmark scripts: run a stage, describe the machine and the commit, append results.

Each stage runs in its own process, as a user would run it, so a benchmark measures what ``mmrec`` does
(start-up and loading included where the script says so) and a GPU's memory is fresh for every stage.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"


def mmrec(*args: str) -> float:
    """Run ``mmrec <args>`` from the repository root; return its wall time in seconds (start-up included)."""
    command = [sys.executable, "-m", "mmrec.cli", *args]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def option_words(options: list[str]) -> list[str]:
    """The words of a repeatable ``"--key value"`` option (``--override``, ``--test_option``...), for a command line:
    each value is kept whole, spaces and all, after its key."""
    return [word for option in options for word in option.split(maxsplit=1)]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_json_if_any(path: Path) -> dict | None:
    """The document at ``path``, None where a failed stage left none (or a broken one)."""
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def matmul_tflops(size: int = 8192, repeats: int = 5) -> float | None:
    """Median bf16 rate (TFLOP/s) of a ``size``^3 matrix product on the GPU, CUDA-event timed: the
    denominator of MFU. None without a GPU."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / statistics.median(times) / 1e12


def mfu(spec: dict, tokens_per_second: float | None, peak_tflops: float | None, world_size: int = 1) -> float | None:
    """Model FLOP utilisation of an LLM head's training from its ``recommender.json`` ``spec``: 6 FLOP per
    backbone parameter and token under full fine-tuning, 4 under LoRA (no weight gradients for frozen
    weights), over the measured matmul rate of every device. None where a figure is missing."""
    if not peak_tflops or not tokens_per_second:
        return None
    per_token = (6 if spec["hparams"]["backbone"].get("finetune") == "full" else 4) * spec["backbone_parameters"]
    return per_token * tokens_per_second / (peak_tflops * 1e12 * max(1, world_size))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """GPU (if any), CPU model and core count, torch version: what a timing was measured on."""
    parts = []
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
    parts.append(f"CPU {cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=False)
    commit = result.stdout.strip() or "unknown"
    return commit + ("+uncommitted changes" if dirty.stdout.strip() else "")


def append_section(path: Path, text: str) -> None:
    """Append a Markdown section, creating the file with a title if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        path.write_text("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n")
    with path.open("a") as handle:
        handle.write("\n" + text.rstrip() + "\n")
    print(f"appended to {path}")
