"""The command line: version, info, demo, and a clean error for an unknown command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kimi_linear import __version__
from kimi_linear.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_info_lists_versions_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    import torch

    assert torch.__version__ in out
    assert "KDA backend on" in out


def test_demo_agrees(capsys):
    assert main(["demo", "--seq-len", "70", "--heads", "2", "--head-dim", "16"]) == 0
    assert "agree to fp64 rounding: yes" in capsys.readouterr().out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "kimi_linear.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kimi_linear, kimi_linear.ops.kda, kimi_linear.backends as b\n"
        "assert b.triton_version() is None\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
