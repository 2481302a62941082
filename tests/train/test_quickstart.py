"""The quickstart end to end in its CI mode (tiny model, fixed steps): train, evaluate, save a
checkpoint transformers loads with the same logits, plot, sample."""

from __future__ import annotations

import json

import pytest
import torch

from kimi_linear.cli import main


def test_quickstart_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    rc = main(["quickstart", "--tiny", "--steps", "80", "--out", str(out), "--no-progress", "--max-new-tokens", "12",
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 80
    # the pipeline learns: validation loss (held-out files) under the unigram baseline
    assert summary["val_loss"] < summary["unigram_entropy"] - 0.1, summary
    model_dir = out / "model"
    for name in ("config.json", "kimi_linear_tokenizer.json", "trainer_state.pt"):
        assert (model_dir / name).is_file()
    assert list(model_dir.glob("*.safetensors"))
    assert (out / "loss.png").stat().st_size > 5000
    assert "validation loss" in printed and str(model_dir) in printed
    assert isinstance(summary["sample"], str)

    transformers = pytest.importorskip("transformers")
    from kimi_linear.model.modeling import KimiLinearForCausalLM

    hf = transformers.KimiLinearForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ours = KimiLinearForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(b"import os\nprint(os.getcwd())\n")])
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-3


def test_quickstart_missing_corpus_fails_before_work(tmp_path):
    with pytest.raises(SystemExit, match="data path not found"):
        main(["quickstart", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "qs")])
    assert not (tmp_path / "qs").exists()
