"""The `mmrec` dispatcher and the configuration hub: every shipped YAML parses with its stage's parser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmrec.cli import STAGES, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("tests/conf/*.yaml")])


def stage_of(config: Path) -> str:
    """A config's stage is the longest stage name its file name starts with (`fit-quantizer-mse.yaml`)."""
    matches = [stage for stage in STAGES if config.stem == stage or config.stem.startswith(f"{stage}-")]
    if not matches:
        raise AssertionError(f"{config}: file name does not start with a stage name ({', '.join(STAGES)})")
    return max(matches, key=len)


def test_help_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)


def test_unknown_stage_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit-everything"]) == 2
    assert "unknown stage 'fit-everything'" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    result = subprocess.run([sys.executable, "-m", "mmrec.cli", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "fit-recommender" in result.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([stage, "--help"]) == 0
    assert f"mmrec {stage}" in capsys.readouterr().out


def test_every_stage_has_demo_and_beauty_configs() -> None:
    for folder in ("demo", "beauty"):
        shipped = {stage_of(path) for path in CONFIGS if path.parent.name == folder}
        assert shipped == set(STAGES), f"configs/{folder} lacks {set(STAGES) - shipped}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([stage_of(config), "--config", str(config), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip(), f"{config}: --print_config printed nothing"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shipped_config_limits_batches_with_an_ambiguous_one(config: Path) -> None:
    """Lightning reads ``limit_*_batches: 1`` as one batch and ``1.0`` as every batch, and one install got
    ``1.0`` from a YAML ``1``: the generative head then validated on all users (bench/RESULTS.md, session 7).
    Shipped configs say what they mean another way (``data.val_users``)."""
    trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer") or {}
    ambiguous = {key: value for key, value in trainer.items() if key.startswith("limit_") and type(value) is int and value == 1}
    assert not ambiguous, f"{config}: {ambiguous} reads as one batch or as every batch; use data.val_users"
