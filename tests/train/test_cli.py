"""``kimi-linear train`` / ``plot`` command lines: config file < flags, clear errors before work."""

from __future__ import annotations

import argparse
import json

import pytest

from kimi_linear.cli import main
from kimi_linear.train.config import TrainConfig, add_config_arguments, config_from_args


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_defaults_file_and_flags_precedence(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('[train]\nseq_len = 64\nlr = 0.002\ndata = ["a", "b"]\nvarlen = true\n')
    cfg = _parse(["--config", str(toml), "--lr", "0.005", "--no-varlen", "--model-override", "hidden_size=64",
                  "--model-override", 'linear_attn_config={"num_heads": 2}'])
    assert cfg.seq_len == 64 and cfg.lr == 0.005 and cfg.data == ["a", "b"] and cfg.varlen is False
    assert cfg.model_overrides == {"hidden_size": 64, "linear_attn_config": {"num_heads": 2}}
    assert cfg.batch_size == TrainConfig().batch_size
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"steps": 7, "schedule": "wsd"}))
    cfg = _parse(["--config", str(js)])
    assert cfg.steps == 7 and cfg.schedule == "wsd"


def test_bad_inputs_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"learnig_rate": 1}))
        _parse(["--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        _parse(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _parse(["--model-override", "hidden_size"])
    with pytest.raises(SystemExit, match="lr must be > 0"):
        main(["train", "--lr", "-1", "--out-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="data path not found"):
        main(["train", "--data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit, match="metrics.jsonl"):
        main(["plot", str(tmp_path)])


def test_train_command_runs_and_plots(tmp_path, capsys):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(4):
        (d / f"{i}.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}.{j} " * 20}) for j in range(5)))
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny", "--model-override", "hidden_size=32", "--model-override", "num_hidden_layers=2",
               "--model-override", 'linear_attn_config={"full_attn_layers": [2], "kda_layers": [1], "head_dim": 8, '
               '"num_heads": 2, "short_conv_kernel_size": 4}', "--model-override", "intermediate_size=64",
               "--data", str(d), "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--eval-every", "2",
               "--eval-rows", "2", "--save-every", "0", "--no-progress", "--threads", "1", "--val-fraction", "0.25",
               "--out-dir", str(out)])
    assert rc == 0 and "done: 3 steps" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file()
    assert main(["plot", str(out)]) == 0 and (out / "loss.png").is_file()
