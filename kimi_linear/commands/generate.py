"""``kimi-linear generate --model DIR --prompt TEXT``: stream a completion to the terminal.

The tokenizer comes from the model directory (``kimi_linear_tokenizer.json``, an HF ``tokenizer.json``
or a tiktoken rank file, see :func:`kimi_linear.train.tokenizers.load_tokenizer`); a directory with
none of them falls back to raw bytes (ids 0-255), which is what byte-level checkpoints use.
Several ``--prompt`` options make a batch (left-padded); the first row is streamed, all rows are
printed at the end, then the decode speed.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with a saved model (streams to the terminal)")
    p.add_argument("--model", required=True, help="model directory (config.json + safetensors [+ tokenizer])")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sample when a temperature, "
                                                          "top-k or top-p is given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop when this text is generated (repeatable)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly on CUDA")
    p.set_defaults(handler=run)


class _BytesFallback:
    """Raw UTF-8 bytes as ids 0-255 (for model directories without tokenizer files)."""

    kind = "bytes-fallback"
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tokenizer_for(model_dir: str):
    """The model directory's tokenizer, or raw bytes when it has none."""
    try:
        from kimi_linear.train.tokenizers import load_tokenizer
    except ImportError:
        return _BytesFallback()
    try:
        return load_tokenizer(model_dir)
    except FileNotFoundError:
        return _BytesFallback()


class _Printer:
    """Prints row 0's text as it grows, holding back a trailing partial UTF-8 character."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tok, self.out = tokenizer, out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = ""
        self.done = False

    def __call__(self, event) -> None:
        if self.done:  # row 0 stopped earlier: the step carries padding for it
            return
        self.done = bool(event.finished[0])
        self.ids.append(int(event.tokens[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") and not self.done:
            return
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


    def finish(self) -> None:
        """Print what was held back (a trailing partial character at the end of the output)."""
        text = self.tok.decode(self.ids)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    import torch

    from kimi_linear.generation.generate import generate
    from kimi_linear.model.modeling import KimiLinearForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = KimiLinearForCausalLM.from_pretrained(args.model, device=device, dtype=dtype).eval()
    model.pack_experts_()  # the prefill's grouped GEMMs read the experts in place (no copy per call)
    tok = load_tokenizer_for(args.model)
    prompts = [tok.encode(p) for p in args.prompt]
    if any(len(p) == 0 for p in prompts):
        print("error: empty prompt", file=sys.stderr)
        return 2
    T = max(len(p) for p in prompts)
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    eos = getattr(tok, "eos_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    stops = [tok.encode(s) for s in args.stop]
    sample = not args.greedy and (args.temperature != 1.0 or args.top_k > 0 or args.top_p < 1.0)
    printer = _Printer(tok)
    print(args.prompt[0], end="", flush=True)
    out = generate(
        model, ids, mask, max_new_tokens=args.max_new_tokens, do_sample=sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, eos_token_id=eos,
        stop_sequences=stops, seed=args.seed, streamer=printer,
        cuda_graph=False if args.no_cuda_graph else None,
    )
    printer.finish()
    if len(prompts) > 1:
        for b in range(1, len(prompts)):
            print(f"--- [{b}] {args.prompt[b]}{tok.decode(out.new_tokens[b])}")
    n = sum(len(t) for t in out.new_tokens)
    print(f"[{n} tokens; prefill {out.prefill_s * 1e3:.1f} ms; decode {out.tokens_per_second:.1f} tokens/s "
          f"({out.decode_steps} steps, batch {len(prompts)}, {device.type}"
          f"{', CUDA graph' if out.cuda_graph else ''}); finish: {', '.join(out.finish_reason)}]", file=sys.stderr)
    return 0
