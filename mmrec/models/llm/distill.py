"""Knowledge distillation from SASRec into the fusion head, for training only.

Cross-entropy on the next item gives each training prefix one positive and treats every other item alike.
The trained SASRec of ``fit-collab`` ranks the whole catalog for the same prefix, so its softened
distribution is a dense target that says which other items are plausible too: it regularises a head that
overfits after a few epochs and gives every prefix the teacher's full ranking. The loss, for the student's
logits ``s`` and the teacher's ``t`` over all items of one prefix (Hinton et al., 2015; ``T^2`` keeps the
soft targets' gradients at the scale of the hard ones whatever the temperature ``T``)::

    (1 - w) * CE(s, next item) + w * T^2 * KL(softmax(t / T) || softmax(s / T))

The teacher never trains and is never saved: test-time scores come from the LLM alone.

A ``shifted`` batch needs the teacher's ranking after every prefix of each sequence, and one SASRec pass over
the whole sequence does not give it: SASRec numbers positions from the right (the most recent item always
sits at the last position), so its state at position ``j`` of the whole sequence differs from the state it
gives the prefix ending at ``j`` read alone. The teacher therefore reads each prefix as its own
right-aligned window (:func:`prefix_windows`), which gives ``shifted`` batches the same targets as
``prefix`` batches of the same samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.errors import InputError
from mmrec.models.sasrec import SASRec


def check_distillation(weight: float, temperature: float) -> None:
    """Refuse a weight outside ``[0, 1)`` (1 would drop the next item's cross-entropy altogether) or a
    temperature that is not a positive number."""
    if not 0.0 <= weight < 1.0:
        raise InputError(f"model.distill_weight must be in [0, 1) (the share of the loss distilled from SASRec), got {weight}")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise InputError(f"model.distill_temperature must be a positive number, got {temperature}")


def prefix_windows(history: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Every prefix of left-padded histories ``[B, L]`` as a left-padded window of its own: items and mask
    ``[B, L, L]``, where window ``j`` holds the history up to position ``j``, right-aligned."""
    length = history.shape[1]
    steps = torch.arange(length, device=history.device)
    source = steps[None, :] + steps[:, None] - (length - 1)  # window j, slot k: position k - (L - 1 - j)
    inside = source >= 0
    source = source.clamp(min=0)
    return history[:, source], mask[:, source] & inside


class FrozenTeacher(nn.Module):
    """A trained SASRec that scores prefixes for distillation and never trains.

    Its parameters need no gradient, so the optimiser, checkpoints and exports (which take trained tensors
    only) leave them out; it stays in eval mode whatever mode the student is put in, so no dropout blurs the
    targets. It is a registered submodule so that it moves to the student's device with the student.
    """

    def __init__(self, sasrec: SASRec) -> None:
        super().__init__()
        self.sasrec = sasrec.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @property
    def num_items(self) -> int:
        return int(self.sasrec.hparams.num_items)

    def next_item_logits(self, history: Tensor, mask: Tensor) -> Tensor:
        """``[B, N]`` float32 scores of every item after each left-padded history ``[B, L]``."""
        with torch.no_grad(), torch.autocast(history.device.type, enabled=False):
            return self.sasrec.score_batch({"history": history, "mask": mask})

    def prefix_logits(self, history: Tensor, mask: Tensor) -> Tensor:
        """``[B, L, N]`` float32 scores after each prefix of left-padded histories ``[B, L]`` (one SASRec
        pass over ``B * L`` windows); rows at padded positions are meaningless and must be ignored."""
        windows, valid = prefix_windows(history, mask)
        return self.next_item_logits(windows.flatten(0, 1), valid.flatten(0, 1)).unflatten(0, history.shape)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float, valid: Tensor, columns: Tensor | None = None) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over the rows where ``valid``.

    ``student``, ``teacher``: logits ``[M, N]``; ``valid``: ``[M]`` bool; ``columns``: ``[N]`` bool, the items both
    distributions run over (None: all; the student's logits may be ``-inf`` outside them). Rows are masked, not
    selected, so that no shape depends on the data and the step never waits on the host; float32 throughout.
    """
    student, teacher = student.float() / temperature, teacher.float() / temperature
    if columns is not None:
        student, teacher = student.masked_fill(~columns, float("-inf")), teacher.masked_fill(~columns, float("-inf"))
    log_student, log_teacher = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)
    if columns is not None:  # 0 * (-inf - -inf) would be NaN, in the backward pass too
        log_student, log_teacher = log_student.masked_fill(~columns, 0.0), log_teacher.masked_fill(~columns, 0.0)
    divergence = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=-1)
    divergence = torch.where(valid, divergence, torch.zeros_like(divergence))
    return temperature**2 * divergence.sum() / valid.sum().clamp(min=1)
