"""HostStaging: checkpoint copies in reused host buffers, never overwritten while a write still reads them."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mmrec.stages.host_staging import HostStaging
from mmrec.stages.resume import AtomicCheckpointIO, BackgroundCheckpointIO


def checkpoint(step: torch.Tensor) -> dict[str, Any]:
    return {"state_dict": {"w": step.float().expand(3).clone(), "step": step}, "epoch": 1, "name": "best"}


def test_a_staged_copy_keeps_the_values_of_when_it_was_taken() -> None:
    staging = HostStaging()
    step = torch.tensor(1)
    staged, _ = staging.stage(checkpoint(step))
    step += 1
    assert staged["state_dict"]["step"] == 1 and staged["epoch"] == 1 and staged["name"] == "best"
    assert staged["state_dict"]["step"] is not step


def test_a_released_set_is_reused_and_a_held_one_is_not() -> None:
    staging = HostStaging(sets=2)
    first, first_set = staging.stage(checkpoint(torch.tensor(1)))
    second, _ = staging.stage(checkpoint(torch.tensor(2)))  # the first is still being written
    assert second["state_dict"]["w"].data_ptr() != first["state_dict"]["w"].data_ptr()
    assert first["state_dict"]["step"] == 1
    staging.release(first_set)
    third, _ = staging.stage(checkpoint(torch.tensor(3)))
    assert third["state_dict"]["w"].data_ptr() == first["state_dict"]["w"].data_ptr()  # no new allocation
    assert third["state_dict"]["step"] == 3


def test_a_changed_shape_gets_a_new_buffer_and_surplus_buffers_go() -> None:
    staging = HostStaging(sets=1)
    _, buffers = staging.stage({"a": torch.zeros(2), "b": torch.zeros(3)})
    staging.release(buffers)
    staged, buffers = staging.stage({"a": torch.ones(4)})
    assert staged["a"].tolist() == [1.0] * 4 and len(buffers.buffers) == 1


def test_staging_waits_for_a_free_set_when_every_set_is_being_written() -> None:
    staging = HostStaging(sets=1)
    _, held = staging.stage(checkpoint(torch.tensor(1)))
    released_at: list[float] = []

    def write_then_release() -> None:
        time.sleep(0.3)
        released_at.append(time.perf_counter())
        staging.release(held)

    threading.Thread(target=write_then_release).start()
    staging.stage(checkpoint(torch.tensor(2)))
    assert released_at and time.perf_counter() >= released_at[0]


def test_sets_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sets must be at least 1"):
        HostStaging(sets=0)


class SlowCheckpointIO(AtomicCheckpointIO):
    """A write that takes a while, as a 1.7 GB checkpoint does."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        time.sleep(0.3)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_background_writes_from_one_reused_set_each_hold_their_own_values(tmp_path: Path) -> None:
    """With one set, the second save must wait for the first write before it overwrites the buffers: a save
    that did not would write step 2 into the first file."""
    io_ = BackgroundCheckpointIO(SlowCheckpointIO(), staging=HostStaging(sets=1))
    step = torch.tensor(1)
    io_.save_checkpoint(checkpoint(step), tmp_path / "best.ckpt")
    step += 1
    io_.save_checkpoint(checkpoint(step), tmp_path / "last.ckpt")
    step += 1
    io_.teardown()
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["state_dict"]["step"] == 1
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]["step"] == 2
    assert io_.staging_seconds >= 0.25  # the second save waited for the first write


def test_a_failed_write_hands_its_set_back(tmp_path: Path) -> None:
    class Failing(AtomicCheckpointIO):
        def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("disk full")

    io_ = BackgroundCheckpointIO(Failing(), staging=HostStaging(sets=1))
    with pytest.raises(OSError, match="disk full"):  # raised by the save or, if the write is slower, the wait
        io_.save_checkpoint(checkpoint(torch.tensor(1)), tmp_path / "a.ckpt")
        io_.wait()
    done = threading.Event()  # a next copy must not hang on the failed write's set
    threading.Thread(target=lambda: (io_.staging.stage(checkpoint(torch.tensor(2))), done.set()), daemon=True).start()
    assert done.wait(5)


def test_a_copy_that_fails_hands_its_set_back() -> None:
    staging = HostStaging(sets=1)

    class Unreadable(torch.Tensor):
        def detach(self) -> torch.Tensor:
            raise RuntimeError("cannot read")

    with pytest.raises(RuntimeError, match="cannot read"):
        staging.stage({"w": torch.zeros(2).as_subclass(Unreadable)})
    done = threading.Event()
    threading.Thread(target=lambda: (staging.stage({"w": torch.zeros(2)}), done.set()), daemon=True).start()
    assert done.wait(5)

