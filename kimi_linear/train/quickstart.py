"""The quickstart: train a small Kimi Linear on this machine in a few minutes, end to end.

What it does (``kimi-linear quickstart``, the README's first command):

1. takes the embedded corpus (the Python standard library's sources, split into train/validation
   by file) and the byte tokenizer -- nothing is downloaded;
2. computes the unigram baseline: the entropy of the training data's byte distribution (nats per
   token), the loss of a model that ignores context;
3. trains a small 3:1 hybrid (3 KDA layers, 1 MLA layer, MoE MLPs with 8 experts, top-2 + a shared
   expert) for the time budget, with a progress bar;
4. evaluates the validation loss and compares it with the baseline;
5. saves the model in the official checkpoint format (``transformers`` loads it), writes the
   loss plot, generates a sample continuation, and prints where everything went.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kimi_linear.train.config import TrainConfig
from kimi_linear.train.corpus import list_files, split_files
from kimi_linear.train.data import unigram_entropy
from kimi_linear.train.tokenizers import ByteTokenizer

# The quickstart model: the "tiny" preset's 3:1 hybrid with MoE, sized for a 2-core CPU.
QUICKSTART_MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    moe_intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=2,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    linear_attn_config={"full_attn_layers": [4], "kda_layers": [1, 2, 3], "head_dim": 32, "num_heads": 2,
                        "short_conv_kernel_size": 4},
    num_experts=8,
    num_experts_per_token=2,
    num_shared_experts=1,
)
TINY_MODEL = dict(QUICKSTART_MODEL, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  linear_attn_config=dict(QUICKSTART_MODEL["linear_attn_config"], head_dim=16))

DEFAULT_PROMPT = "def read_config(path):\n    "


@dataclass
class QuickstartOptions:
    minutes: float = 5.0
    steps: int | None = None  # fixed step count instead of the time budget
    out: str = "runs/quickstart"
    tiny: bool = False  # CI smoke mode: a very small model and batch
    seed: int = 0
    device: str = "auto"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 160
    progress: bool = True
    data: tuple[str, ...] = ("stdlib",)  # the corpus; the embedded default needs no files


def quickstart_config(opts: QuickstartOptions) -> TrainConfig:
    on_gpu = torch.cuda.is_available() and opts.device in ("auto", "cuda")
    model = TINY_MODEL if opts.tiny else QUICKSTART_MODEL
    seq_len = 64 if opts.tiny else 128
    batch = 4 if opts.tiny else (64 if on_gpu else 16)
    return TrainConfig(
        model="tiny-moe", model_overrides=dict(model), tokenizer="byte", data=list(opts.data), val_fraction=0.02,
        seq_len=seq_len, batch_size=batch, steps=opts.steps, minutes=None if opts.steps else opts.minutes,
        lr=3e-3, min_lr_ratio=0.1, schedule="cosine", warmup_steps=5 if opts.tiny else 20, weight_decay=0.1,
        grad_clip=1.0, moe_bias_update_rate=1e-2, seed=opts.seed, out_dir=opts.out, eval_every=0 if opts.tiny else 100,
        eval_rows=8 if opts.tiny else 128, save_every=0, log_every=1 if opts.tiny else 5,
        overwrite=True, progress=opts.progress, device=opts.device,
    )


def sample(model_dir: Path, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """A continuation of ``prompt`` from the saved model (temperature 0.8 sampling, seeded)."""
    from kimi_linear.generation.generate import generate
    from kimi_linear.model.modeling import KimiLinearForCausalLM

    tok = ByteTokenizer()
    model = KimiLinearForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
    out = generate(model, ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40,
                   eos_token_id=tok.eos_id, seed=seed)
    return tok.decode(out.new_tokens[0])


def transformers_check(model_dir: Path, prompt: str) -> str:
    """Load the checkpoint with ``transformers`` and compare its logits with ours on ``prompt``."""
    try:
        from transformers import KimiLinearForCausalLM as HFModel
    except ImportError:
        return "transformers not installed (pip install 'kimi-linear[hf]') -- skipped"
    from kimi_linear.model.modeling import KimiLinearForCausalLM

    ids = torch.tensor([ByteTokenizer().encode(prompt)], dtype=torch.long)
    ours = KimiLinearForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = HFModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        a = ours(ids).logits
        b = hf(ids).logits
    diff = (a - b).abs().max().item()
    return f"transformers.KimiLinearForCausalLM loads it; max |logit difference| vs ours = {diff:.2e}"


def run_quickstart(opts: QuickstartOptions) -> dict:
    from kimi_linear.train.plot import plot_run
    from kimi_linear.train.trainer import train

    t_start = time.perf_counter()
    budget = f"{opts.steps} steps" if opts.steps else f"{opts.minutes:g} min"
    print(f"kimi-linear quickstart: train a small Kimi Linear for {budget} on this machine, then evaluate, save, "
          f"plot and sample (Ctrl-C stops)")
    out = Path(opts.out)
    cfg = quickstart_config(opts)
    tok = ByteTokenizer()
    train_files, val_files = split_files(list_files(cfg.data), cfg.val_fraction, cfg.seed)
    mb = sum(f.path.stat().st_size for f in train_files) / 1e6
    where = "Python standard library sources on this machine" if list(opts.data) == ["stdlib"] else ", ".join(opts.data)
    print(f"corpus: {where}, {len(train_files)} training files ({mb:.1f} MB), "
          f"{len(val_files)} held-out validation files")
    h = unigram_entropy(train_files, tok.encode, tok.eos_id, tok.vocab_size)
    print(f"unigram baseline (entropy of the training bytes): {h:.3f} nats/token")
    print(f"training a 3:1 KDA/MLA hybrid with MoE for {budget} "
          f"({cfg.batch_size} x {cfg.seq_len} bytes per step) -> {out}")
    out.mkdir(parents=True, exist_ok=True)
    result = train(cfg)
    info = {"title": "quickstart: byte-level Kimi Linear, " + ("stdlib corpus" if list(opts.data) == ["stdlib"] else "your corpus"),
            "unigram_entropy": h}
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    val = result.val_losses.get(result.steps)
    png = plot_run(out, out / "loss.png")
    text = sample(result.final_dir, opts.prompt, opts.max_new_tokens, opts.seed)
    check = transformers_check(result.final_dir, opts.prompt)
    summary = {
        "steps": result.steps, "tokens": result.steps * cfg.batch_size * cfg.seq_len,
        "train_minutes": round(result.elapsed_s / 60, 2), "tokens_per_s": round(result.tokens_per_s),
        "val_loss": val, "unigram_entropy": h, "val_bits_per_byte": (val / 0.6931471805599453) if val else None,
        "model_dir": str(result.final_dir), "plot": str(png), "metrics": str(out / "metrics.jsonl"),
        "sample_prompt": opts.prompt, "sample": text, "transformers": check,
        "wall_minutes": round((time.perf_counter() - t_start) / 60, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print("=" * 72)
    if val is not None:
        verdict = "below" if val < h else "NOT below"
        print(f"validation loss {val:.3f} nats/token ({summary['val_bits_per_byte']:.2f} bits/byte) -- "
              f"{verdict} the unigram baseline {h:.3f} by {h - val:.3f}")
    print(f"trained {result.steps} steps, {summary['tokens']:,} tokens in {summary['train_minutes']} min "
          f"({summary['tokens_per_s']:,} tokens/s)")
    print(f"sample continuation of {opts.prompt!r}:")
    print("-" * 72)
    print(opts.prompt + text)
    print("-" * 72)
    print(check)
    print(f"model (official format, transformers-loadable): {result.final_dir}")
    print(f"loss plot:  {png}")
    print(f"metrics:    {out / 'metrics.jsonl'}")
    print(f"summary:    {out / 'summary.json'}")
    print(f"generate more: kimi-linear generate --model {result.final_dir} --prompt 'import os' --temperature 0.8")
    return summary
