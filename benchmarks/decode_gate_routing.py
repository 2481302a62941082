"""Why a decode benchmark's correctness gate moved: per-position error and the experts each path chose.

`kimi-linear bench decode` gates each model on cached prefill + decode steps against the full forward
(fp32, 4 layers). A gate error well above rounding can be a wrong kernel or a routing flip: two
computations of the same logits, equal to rounding, choosing different experts where the k-th and
(k+1)-th scores nearly tie. This prints, per gated position, the relative logit error, and per MoE layer
where the cached path chose other experts than the full forward, the score margin at the cut.

    PYTHONPATH=. python benchmarks/decode_gate_routing.py --layout mla
"""

from __future__ import annotations

import argparse

import torch


@torch.no_grad()
def main() -> None:
    from kimi_linear.bench.model_decode import GATE_SEED, bench_config, build_model
    from kimi_linear.generation.cache import cache_for_config
    from kimi_linear.generation.generate import _model_dtype, forward_last_logits
    from kimi_linear.layers.moe import SparseMoeBlock

    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="mla")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=163840)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(GATE_SEED)  # the benchmark's gate model, weight for weight
    model = build_model(bench_config(args.layout, layers=args.layers, vocab=args.vocab), dev, torch.float32)
    calls: list[tuple[SparseMoeBlock, torch.Tensor, torch.Tensor]] = []
    original = SparseMoeBlock.route

    def recording(self, x, *a, **kw):
        w, i = original(self, x, *a, **kw)
        calls.append((self, x.clone(), i.clone()))
        return w, i

    SparseMoeBlock.route = recording
    g = torch.Generator(device="cpu").manual_seed(0)  # the gate's inputs (kimi_linear.bench.model_decode.gate)
    ids = torch.randint(0, model.config.vocab_size, (2, 68), generator=g).to(dev)
    full = model(ids).logits.float()
    full_calls = list(calls)
    calls.clear()
    cache = cache_for_config(model.config, batch_size=2, max_len=68, device=dev, dtype=_model_dtype(model))
    outs = [forward_last_logits(model, ids[:, :64], cache)]
    n_prefill = len(calls)
    for t in range(64, 67):
        outs.append(forward_last_logits(model, ids[:, t:t + 1], cache))
    got = torch.stack(outs, 1).float()
    ref = full[:, 63:67]
    print(f"{args.layout}: gate rel RMS {((got - ref).norm() / ref.norm()).item():.3e}")
    for j, pos in enumerate(range(63, 67)):
        for b in range(2):
            e = ((got[b, j] - ref[b, j]).norm() / ref[b, j].norm()).item()
            print(f"  position {pos} row {b}: rel error {e:.3e}")
    by_block = {}
    for blk, _x, i in full_calls:
        by_block[id(blk)] = i.view(2, 68, -1)
    step_calls = calls[n_prefill:]
    for s, (blk, x, i) in enumerate(step_calls):
        pos = 64 + s // len(by_block)
        want = by_block[id(blk)][:, pos]
        for b in range(2):
            if set(i[b].tolist()) != set(want[b].tolist()):
                logits = x[b].float() @ blk.gate.weight.float().T
                scores = torch.sigmoid(logits) + (blk.gate.e_score_correction_bias if blk.gate.e_score_correction_bias
                                                  is not None else 0)
                top = scores.sort(descending=True).values
                k = i.shape[1]
                print(f"  routing differs: position {pos} row {b} block {id(blk) % 997}: cached {sorted(i[b].tolist())} "
                      f"full {sorted(want[b].tolist())}; score margin at the cut {(top[k - 1] - top[k]).item():.2e}")


if __name__ == "__main__":
    main()
