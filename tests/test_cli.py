"""The `cheers` command: help, flavors, and the tiny smoke run (train, generate, answer)."""

import subprocess
import sys

from PIL import Image

from cheers_pl.cli import main


def test_python_dash_m_help():
    out = subprocess.run(
        [sys.executable, "-m", "cheers_pl", "--help"], capture_output=True, text=True, check=True
    )
    assert "flavors" in out.stdout and "smoke" in out.stdout


def test_flavors_lists_every_kind(capsys):
    assert main(["flavors"]) == 0
    text = capsys.readouterr().out
    for kind in ("vae", "semantic_encoder", "llm", "cfm_head", "tokenizer"):
        assert kind in text


def test_smoke_trains_generates_and_answers(tmp_path, capsys):
    png = tmp_path / "image.png"
    assert main(["smoke", "--steps", "2", "--out", str(png)]) == 0
    text = capsys.readouterr().out
    assert "losses (total loss after each of 2 steps): [" in text
    assert "answer (random tiny model, expect noise): '" in text  # an empty answer is not a failure
    assert f"image (N, C, H, W): (1, 3, 32, 32), 4 Euler steps; written to {png}" in text
    assert "seconds (build, train, generate, answer): " in text
    assert Image.open(png).size == (32, 32)


def test_info_prints_paper_sizes_without_allocating(capsys):
    assert main(["info", "--preset", "paper"]) == 0
    text = capsys.readouterr().out
    assert "256 LLM tokens" in text
    assert "1,543,714,304" in text and "428,772,800" in text


def test_unknown_commands_name_the_valid_ones(capsys):
    assert main(["bogus"]) == 2
    assert "valid commands are" in capsys.readouterr().err
    assert main(["--version"]) == 0 and "cheers-pl" in capsys.readouterr().out


def test_every_command_has_help():
    from importlib import import_module

    from cheers_pl.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        module, function = target.split(":")
        assert callable(getattr(import_module(module), function)), name
