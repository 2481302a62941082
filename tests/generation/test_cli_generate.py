"""``kimi-linear generate``: loads a saved model + its tokenizer, streams the completion, reports speed."""

from __future__ import annotations

import torch

from kimi_linear.cli import main
from kimi_linear.commands.generate import load_tokenizer_for
from kimi_linear.model import KimiLinearConfig, KimiLinearForCausalLM


def test_cli_generate_streams_what_generate_returns(tmp_path, capsys):
    from kimi_linear.train.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = KimiLinearConfig.preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = KimiLinearForCausalLM(cfg, backend="reference").eval()
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "6", "--greedy",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path, backend="reference").eval()
    ids = torch.tensor([tok.encode("Hello")])
    expect = tok.decode(loaded.generate(ids, max_new_tokens=6, eos_token_id=tok.eos_id).new_tokens[0])
    assert captured.out.rstrip("\n") == "Hello" + expect
    assert "tokens/s" in captured.err


def test_tokenizer_fallback_is_raw_bytes(tmp_path):
    tok = load_tokenizer_for(str(tmp_path))  # a directory with no tokenizer files
    assert tok.encode("hé") == [104, 195, 169] and tok.decode([104, 195, 169]) == "hé"
