"""The prompt: the backbone's chat template around the history's item vectors.

Layout of one user's sequence (``inputs_embeds``)::

    [template + system + instruction tokens] [item 1] ... [item n] [question + assistant header tokens]

The token parts are tokenised once; the suffix may be empty (the recommender's ``readout: item`` reads the
user state at the items themselves, so nothing after the last item is ever read). A batch is right-padded
(padding after each user's last token) and the user state is read at each row's last real token. Right,
not left, padding: causal attention never lets a real token see the padding that follows it, so no
attention mask is needed at all: each user's hidden states are those of a batch of one, and the backbone
runs SDPA's causal kernel (flash attention on a GPU) instead of materialising a padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from mmrec.errors import InputError

ITEMS_MARK = "\x00ITEMS\x00"


@dataclass(frozen=True)
class PromptSpec:
    """The words around the history.

    Args:
        system: system message; None leaves the template's default (if it has one).
        instruction: user-message text before the item vectors.
        question: user-message text after the item vectors.
    """

    system: str | None = "You are a recommender system. You predict a user's next purchase."
    instruction: str = "Here is a user's purchase history:"
    question: str = "Predict the next item."


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, spec: PromptSpec) -> tuple[list[int], list[int]]:
    """Token ids before and after the item vectors, rendered through the tokenizer's chat template.

    A tokenizer without a chat template (a base model) gets the bare ``instruction`` and ``question``.
    """
    content = f"{spec.instruction}\n{ITEMS_MARK}\n{spec.question}"
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": spec.system}] if spec.system else []
        messages.append({"role": "user", "content": content})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = content
    if text.count(ITEMS_MARK) != 1:
        raise InputError("the backbone's chat template dropped or repeated the user message; set model.prompt differently")
    before, after = text.split(ITEMS_MARK)
    return tokenizer(before, add_special_tokens=False)["input_ids"], tokenizer(after, add_special_tokens=False)["input_ids"]


def padding_last(valid: Tensor) -> Tensor:
    """Per-row gather indices that move real positions (``valid``) to the front, in order, and padding to
    the back: a stable sort on "is padding"."""
    return torch.sort((~valid).to(torch.int32), dim=1, stable=True).indices


class PromptSplicer(nn.Module):
    """Builds ``inputs_embeds`` and ``position_ids`` for a batch of histories."""

    def __init__(self, prefix_ids: list[int], suffix_ids: list[int]) -> None:
        super().__init__()
        self.register_buffer("prefix_ids", torch.tensor(prefix_ids, dtype=torch.long), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(suffix_ids, dtype=torch.long), persistent=False)

    @property
    def num_text_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)

    def forward(self, embed: nn.Module, items: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``items [B, L, H]`` (one vector per history item), ``mask [B, L]`` (True on real items).

        Returns ``inputs_embeds [B, T, H]``, ``position_ids [B, T]`` and ``last [B]`` (index of each row's
        final real token), with ``T = prefix + L + suffix`` and all padding (zero vectors) moved to the
        right of each row.
        """
        batch = items.shape[0]
        prefix = embed(self.prefix_ids).to(items.dtype).expand(batch, -1, -1)
        suffix = embed(self.suffix_ids).to(items.dtype).expand(batch, -1, -1)
        sequence = torch.cat([prefix, items, suffix], dim=1)
        valid = torch.cat([mask.new_ones(batch, prefix.shape[1]), mask, mask.new_ones(batch, suffix.shape[1])], dim=1)
        order = padding_last(valid)
        valid = valid.gather(1, order)
        sequence = sequence.gather(1, order.unsqueeze(-1).expand(-1, -1, sequence.shape[-1]))
        sequence = sequence * valid.unsqueeze(-1).to(sequence.dtype)
        position_ids = torch.arange(valid.shape[1], device=valid.device).expand(batch, -1)
        return sequence, position_ids, valid.sum(dim=1) - 1

    def item_positions(self, mask: Tensor) -> Tensor:
        """``[B, L]`` index of each history item in the spliced sequence (0 where ``mask`` is False).

        The items follow the prefix in order once padding has moved right, so item ``j`` of a row with
        ``n`` real items (left-padded to ``L``) sits at ``prefix + j - (L - n)``.
        """
        shift = mask.shape[1] - mask.sum(dim=1, keepdim=True)
        positions = len(self.prefix_ids) + torch.arange(mask.shape[1], device=mask.device) - shift
        return positions.clamp(min=0) * mask
