"""The `loom` console entry point."""

import subprocess
import sys
from pathlib import Path

import yaml

from loomcore.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_subcommands():
    out = subprocess.run([Path(sys.executable).parent / "loom", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("config", "init-models", "import-release", "pipeline"):
        assert name in out
    assert "examples:" in out


def test_config_prints_yaml_section(capsys):
    assert main(["config", "--profile", "paper", "stage1"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["stage1"]["batch_size"] == 640 and d["stage1"]["sampling"]["t2i"] == 0.8


def test_config_override_and_refusal(capsys):
    assert main(["config", "--check", "stage1.steps=10"]) == 0
    assert "config OK (profile tiny" in capsys.readouterr().out
    assert main(["config", "stage1.optimizer.lr=-1"]) == 2
    assert "the learning rate must be positive" in capsys.readouterr().err


def test_parser_has_every_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"config", "init-models", "import-release", "pipeline"} <= set(sub.choices)
