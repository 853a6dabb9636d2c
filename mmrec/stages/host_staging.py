"""Reusable host buffers that a checkpoint's tensors are copied into before a background thread writes them.

A background write must not read tensors that training goes on changing, so the training thread first takes a
copy. Copying a fully fine-tuned LLM head with its AdamW state (some 1.7 GB) into freshly allocated pageable
memory costs that thread time (allocation, page faults, a DMA staged through the driver's own buffer), and
the stages save twice after most validations (the new best checkpoint and ``last.ckpt``). Buffers allocated
once, page-locked when the tensors are on a GPU, and reused turn each copy into one DMA at the link's speed.
On one H200, Beauty's fusion head now spends 0.58 s between two epochs, most of it on these copies
(``bench/RESULTS.md``, session 12: ``epoch_boundary_seconds`` and ``checkpoint_staging_s`` in every manifest).

A set of buffers is reused only when the write that reads it is done: :meth:`HostStaging.stage` waits for a
free set when all ``sets`` are being written (back-pressure: checkpoints cannot be taken faster than the disk
takes them), and the writer hands its set back with :meth:`HostStaging.release`.
"""

from __future__ import annotations

import queue
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection


class BufferSet:
    """The host buffers of one staged checkpoint, in the order its tensors are met."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def fill(self, checkpoint: Any) -> Any:
        """``checkpoint`` with every tensor replaced by a host copy held in this set (reused where the shape
        and dtype match the tensor met at that place last time, allocated otherwise)."""
        position = 0
        on_gpu = False

        def copy(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal position, on_gpu
            source = tensor.detach()
            if position < len(self.buffers) and self._fits(self.buffers[position], source):
                buffer = self.buffers[position]
            else:
                buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
                self.buffers[position:position + 1] = [buffer]
            # page-locked targets let a GPU copy run asynchronously; it is waited for below, once for all
            buffer.copy_(source, non_blocking=source.is_cuda)
            on_gpu |= source.is_cuda
            position += 1
            return buffer

        staged = apply_to_collection(checkpoint, torch.Tensor, copy)
        del self.buffers[position:]  # a smaller checkpoint than last time: its surplus buffers go
        if on_gpu:
            torch.cuda.synchronize()
        return staged

    @staticmethod
    def _fits(buffer: torch.Tensor, source: torch.Tensor) -> bool:
        return buffer.shape == source.shape and buffer.dtype == source.dtype and buffer.is_pinned() == source.is_cuda


class HostStaging:
    """A pool of at most ``sets`` :class:`BufferSet`, each held by one pending write.

    Two sets let the best checkpoint and ``last.ckpt`` of one validation be staged without waiting for the
    first write; a third save before either write ends waits for one of them.

    Args:
        sets: how many checkpoints may be staged and not yet written at once.
    """

    def __init__(self, sets: int = 2) -> None:
        if sets < 1:
            raise ValueError(f"sets must be at least 1, got {sets}")
        self.sets = sets
        self._free: queue.SimpleQueue[BufferSet] = queue.SimpleQueue()
        for _ in range(sets):  # empty until a checkpoint fills them: nothing is allocated before the first save
            self._free.put(BufferSet())

    def stage(self, checkpoint: Any) -> tuple[Any, BufferSet]:
        """Copy ``checkpoint``'s tensors into a free set; return the copy and the set, which the writer must
        :meth:`release` once the copy is written (or has failed to be)."""
        buffer_set = self._free.get()  # when every set is being written, the first to be done
        try:
            return buffer_set.fill(checkpoint), buffer_set
        except BaseException:
            self.release(buffer_set)  # no write will: the set would otherwise be lost to the pool
            raise

    def release(self, buffer_set: BufferSet) -> None:
        """Hand a set back once nothing reads its buffers any more."""
        self._free.put(buffer_set)
