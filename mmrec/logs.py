"""Quiet logs: the third-party notices that every stage would print, silenced where mmrec calls the libraries.

Each stage would otherwise print Lightning's advertisements ("Tip: ... litlogger") and deprecation notices
that torch, transformers and Lightning raise from their own internals (not from mmrec's calls), burying the
lines that matter. Only these exact messages are filtered, by category and message, so any other warning,
mmrec's own included, still shows. ``MMREC_VERBOSE=1`` (``mmrec pipeline --verbose`` sets it for its
stages) turns the filtering off.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "MMREC_VERBOSE"

WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch deprecates LeafSpec; Lightning's own pytree helper still builds one on every fit
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # peft reads transformers' renamed property when it prepares a model for LoRA
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # the MM-RQ-VAE overrides this hook on purpose (it adds per-modality row indices to each batch)
    (UserWarning, r"You have overridden `on_before_batch_transfer` in `LightningModule`"),
)
"""(category, message regex) of each third-party warning silenced in normal runs."""

LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),  # litlogger / litmodels advertisements
    "transformers.utils.generic": ("`past_key_values`/`cache_params` are deprecated",),
}
"""Logger name -> prefixes of the records dropped from it in normal runs."""


class _DropPrefixes(logging.Filter):
    """Drops the records of one logger whose message starts with one of a few known prefixes."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_FILTERS = {name: _DropPrefixes(prefixes) for name, prefixes in LOG_MESSAGES.items()}
"""One filter per logger, so installing them twice (stages run in one process, as in tests) adds none."""


def verbose() -> bool:
    """Whether the user asked for every message (``MMREC_VERBOSE`` set to anything but empty or 0)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_third_party() -> None:
    """Install the filters above; called once by ``mmrec.cli`` before a stage is imported."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, log_filter in _FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)
