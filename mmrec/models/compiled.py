"""``torch.compile`` for training passes, falling back to eager code when compiling fails.

SASRec and the quantizer are tiny: on a GPU a training step is a few hundred kernel launches of a few
microseconds each, so Python and launch overhead, not arithmetic, set the speed. Compiling fuses them. The
LLM heads' backbones gain from fused normalisation, activation and rotary kernels.
A compiler is a large, version-dependent piece of software, though, and a benchmark or a long run must not
die because one graph failed to build on another torch version: :class:`Compiled` then warns once and runs
the function eagerly, which computes the same thing, only slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Compiled:
    """``fn`` through ``torch.compile``; after any failure of the compiled call, ``fn`` itself from then on.

    A failure that is not the compiler's (a shape error, out of memory) raises again from the eager call,
    so no real error is hidden; only the speed-up is given up.
    """

    def __init__(self, fn: Callable[..., Any], name: str, dynamic: bool | None = None) -> None:
        self.fn = fn
        self.name = name
        self.compiled: Callable[..., Any] | None = torch.compile(fn, dynamic=dynamic)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 (dynamo and inductor raise many types)
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                warnings.warn(f"torch.compile of {self.name} failed ({type(exc).__name__}: {first_line[:300]}); "
                              "running it eagerly", stacklevel=2)
                self.compiled = None
        return self.fn(*args, **kwargs)


def _call_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return block(*args, **kwargs)


class _CompiledCall(nn.Module):
    """Stands in for one block of a ``ModuleList`` while :meth:`CompiledBlocks.active` runs: calls the
    shared compiled function on the block (a plain attribute, so the block is not registered twice)."""

    def __init__(self, block: nn.Module, run: Compiled) -> None:
        super().__init__()
        self.__dict__["block"], self.__dict__["run"] = block, run

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.block, *args, **kwargs)


class CompiledBlocks:
    """Regional compilation: a model's repeated blocks (a Llama's decoder layers) through one compiled graph.

    Compiling a whole 30-layer decoder traces and optimises all 30 layers, forward and backward, and does it
    again for every new input shape: on an H200 a compiled fusion head spent most of a 40-step benchmark
    compiling (bench/RESULTS.md, session 4). The layers run the same code on parameters of the same shapes,
    so one compiled graph serves them all (dynamo treats the parameters as inputs); with dynamic shapes it
    also serves every batch size and prompt length. Compile time then is that of one layer, while the
    kernels that eager mode leaves unfused (RMSNorm, rotary, SwiGLU, residual adds) are fused in every
    layer. Embedding, final norm and the heads stay eager: they are a small share of the step.

    The swap happens only inside :meth:`active`, so state dicts, checkpoints, evaluation and decoding (with
    their caches and masks) always see the original, eager blocks.
    """

    def __init__(self, blocks: nn.ModuleList, name: str, dynamic: bool | None = True) -> None:
        self.blocks = blocks
        self.originals = list(blocks)
        self.run = Compiled(_call_block, f"{name} (one decoder layer)", dynamic=dynamic)
        self.stand_ins = [_CompiledCall(block, self.run) for block in self.originals]

    @property
    def compiled(self) -> bool:
        """Whether the compiled graph is still in use (no fallback to eager code so far)."""
        return self.run.compiled is not None

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within this block, calls of the blocks go through the compiled graph."""
        for index, stand_in in enumerate(self.stand_ins):
            self.blocks[index] = stand_in
        try:
            yield
        finally:
            for index, block in enumerate(self.originals):
                self.blocks[index] = block
