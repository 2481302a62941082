"""``kimi-linear model info / presets``."""

from __future__ import annotations

from kimi_linear.cli import main


def test_model_info_48b_counts(capsys):
    assert main(["model", "info", "--preset", "kimi_linear_48b_a3b"]) == 0
    out = capsys.readouterr().out
    assert "20,493 tensors, 49,122,681,728 values" in out
    assert "KKKMKKKMKKKMKKKMKKKMKKKMKKM" in out


def test_model_info_from_config_dir(tmp_path, capsys):
    from kimi_linear.model import KimiLinearConfig

    KimiLinearConfig.preset("tiny-gdn-moe").save_pretrained(tmp_path)
    assert main(["model", "info", "--config", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[gdn]" in out and "MoE 8x top-2" in out
