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
from collections.abc import Callable
from typing import Any

import torch


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
