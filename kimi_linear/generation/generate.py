"""Token generation for :class:`kimi_linear.model.modeling.KimiLinearForCausalLM`: prefill, decode, stopping, streaming.

    prefill   : the (left-padded) prompts in one forward with a fresh :class:`HybridCache`
                (KDA: chunked operator, final state handed to the cache; MLA: expanded attention,
                latents written to the cache); only the last position's logits are computed.
    decode    : one token per row per step (KDA: recurrent kernel + conv window step, state in place;
                MLA: attention read from the latent cache through the absorbed projections). On CUDA
                the step is captured in a CUDA graph per attention-length bucket and replayed.
    sampling  : :mod:`kimi_linear.generation.sampling` (greedy, temperature, top-k, top-p, repetition
                penalty), seeded by a ``torch.Generator``.
    stopping  : end-of-sequence ids, stop sequences (token lists), ``max_new_tokens``.

:func:`stream_generate` yields each step's tokens as they are chosen; :func:`generate` collects them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kimi_linear.generation.cache import HybridCache, cache_for_config
from kimi_linear.generation.sampling import SamplingConfig, mark_seen, next_token


@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    | field          | what                                                                      |
    |----------------|---------------------------------------------------------------------------|
    | sequences      | ``[B, P + N]`` int64: the prompts as given (left padding kept) + new tokens, rows that stopped early padded with ``pad_token_id`` |
    | new_tokens     | per row, the generated ids (stop token included, padding not)             |
    | finish_reason  | per row: ``"eos"``, ``"stop_sequence"`` or ``"length"``                    |
    | prefill_s / decode_s | wall seconds (after a device sync)                                  |
    """

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    finish_reason: list[str]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    cuda_graph: bool = False
    cache: HybridCache | None = field(default=None, repr=False)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all rows) per second of decoding."""
        n = sum(len(t) for t in self.new_tokens) - len(self.new_tokens)  # the first token comes from prefill
        return n / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class StepEvent:
    """One decoding step, as :func:`stream_generate` yields it: ``tokens [B]`` (``pad_token_id`` for rows
    already finished) and ``finished [B]`` bool after this step."""

    tokens: torch.Tensor
    finished: torch.Tensor
    step: int


# --------------------------------------------------------------------------------------------------
# Model glue
# --------------------------------------------------------------------------------------------------


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            if p.dtype != torch.float32 or p.dim() > 1:
                return p.dtype
    return torch.float32


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def forward_last_logits(model, input_ids: torch.Tensor, cache: HybridCache,
                        attention_mask: torch.Tensor | None = None, *, key_len: int | None = None) -> torch.Tensor:
    """One cached forward over ``input_ids [B, T]``; returns the logits of each row's last token ``[B, V]``.

    Opens a cache step (validating the input before anything is written), runs the stack, commits.
    """
    cache.begin_step(input_ids.shape[1], attention_mask, key_len=key_len)
    try:
        hidden = model.model(input_ids, attention_mask=attention_mask, cache=cache)
        hidden = hidden[0] if isinstance(hidden, tuple) else getattr(hidden, "last_hidden_state", hidden)
        logits = model.lm_head(hidden[:, -1])  # left padding: every row's last token sits at T - 1
    except BaseException:
        cache.abort_step()
        raise
    cache.commit_step()
    return logits


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_inputs(input_ids, attention_mask, vocab_size: int, max_new_tokens: int):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an integer tensor [B, T], got "
                        f"{type(input_ids).__name__}{'' if not isinstance(input_ids, torch.Tensor) else ' ' + str(input_ids.dtype)}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; every row needs >= 1 token")
    if attention_mask is not None:
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = {(B, T)}, got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device=input_ids.device).long()
        if bool(attention_mask.sum(1).eq(0).any()):
            raise ValueError(f"empty prompt: rows {attention_mask.sum(1).eq(0).nonzero().flatten().tolist()} have no tokens")
        if bool(attention_mask.bool().all()):
            attention_mask = None
    valid = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    lo, hi = int(valid.min()), int(valid.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}), got min {lo}, max {hi}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    return input_ids.long(), attention_mask


def _as_id_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(i) for i in eos_token_id]


# --------------------------------------------------------------------------------------------------
# CUDA-graph decode step
# --------------------------------------------------------------------------------------------------


class _GraphedDecoder:
    """Decode steps replayed from CUDA graphs, one graph per attention-length bucket.

    The graph reads a static token buffer, writes the cache in place (static buffers) and leaves the
    last logits in a static output; attention spans ``bucket`` cache positions, masked by length, so
    shapes never change within a bucket. The first step of each bucket runs eagerly (it warms up the
    kernels and is a real step), the graph is captured right after and serves the following steps.
    """

    def __init__(self, model, cache: HybridCache, min_bucket: int = 256) -> None:
        self.model, self.cache = model, cache
        self.min_bucket = min_bucket
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        self.pool = None
        self.failed = False

    def bucket(self, max_len_now: int) -> int:
        b = self.min_bucket
        while b < max_len_now:
            b *= 2
        return min(b, self.cache.max_len)

    def step(self, tokens: torch.Tensor, max_len_after: int) -> torch.Tensor:
        bucket = self.bucket(max_len_after)
        self.tokens.copy_(tokens.view(-1, 1))
        if self.failed:
            return forward_last_logits(self.model, self.tokens, self.cache, key_len=bucket)
        if bucket not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = forward_last_logits(self.model, self.tokens, self.cache, key_len=bucket)
            torch.cuda.current_stream().wait_stream(stream)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = forward_last_logits(self.model, self.tokens, self.cache, key_len=bucket)
                self.pool = graph.pool()
                self.graphs[bucket] = (graph, out)
            except Exception as exc:  # noqa: BLE001 - a step that syncs the host cannot be captured
                import warnings

                self.cache.abort_step()
                warnings.warn(f"decode step not capturable in a CUDA graph ({exc}); running it eagerly", stacklevel=3)
                self.failed = True
            return logits
        graph, out = self.graphs[bucket]
        graph.replay()
        return out


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def stream_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    cache: HybridCache | None = None,
    max_len: int | None = None,
    cuda_graph: bool | None = None,
    _stats: dict | None = None,
) -> Iterator[StepEvent]:
    """Generate token by token, yielding a :class:`StepEvent` per step (arguments as :func:`generate`)."""
    config = model.config
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask, config.vocab_size, max_new_tokens)
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty)
    device = _model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    B, T = input_ids.shape
    prompt_lens = attention_mask.sum(1).tolist() if attention_mask is not None else [T] * B
    need = max(prompt_lens) + max(max_new_tokens - 1, 0)
    if cache is None:
        cache = cache_for_config(config, batch_size=B, max_len=max(max_len or need, need), device=device,
                                 dtype=_model_dtype(model))
    else:
        cache.check_batch(B, "input_ids")
        have = cache.lengths.tolist()
        if max(h + n for h, n in zip(have, prompt_lens)) + max(max_new_tokens - 1, 0) > cache.max_len:
            raise ValueError(
                f"prompt ({max(prompt_lens)} tokens) + {max_new_tokens} new tokens do not fit the cache "
                f"(max_len={cache.max_len}, already cached {have})"
            )
    if _stats is not None:
        _stats["cache"] = cache
    if max_new_tokens == 0:
        return
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    eos = torch.tensor(_as_id_list(eos_token_id), dtype=torch.long, device=device)
    stops = [list(map(int, s)) for s in (stop_sequences or []) if len(s) > 0]
    pad = int(pad_token_id if pad_token_id is not None else (config.pad_token_id or 0))
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        mark_seen(seen, input_ids, attention_mask)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = forward_last_logits(model, input_ids, cache, attention_mask)
    use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    graphed = _GraphedDecoder(model, cache) if use_graph else None

    finished = torch.zeros(B, dtype=torch.bool, device=device)
    history: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    lengths_host = cache.lengths.tolist()  # tracked on the host so graph buckets need no device sync
    for step in range(max_new_tokens):
        tok = next_token(logits, sampling, seen=seen, generator=generator)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        if seen is not None:
            mark_seen(seen, tok, ~finished)
        done_now = torch.zeros_like(finished)
        if eos.numel():
            done_now |= torch.isin(tok, eos) & ~finished
        tok_host = tok.tolist()
        fin_host = finished.tolist()
        eos_host = done_now.tolist()
        for b in range(B):
            if fin_host[b]:
                continue
            history[b].append(tok_host[b])
            if eos_host[b]:
                reasons[b] = "eos"
            elif any(len(history[b]) >= len(s) and history[b][-len(s):] == s for s in stops):
                reasons[b] = "stop_sequence"
                done_now[b] = True
        finished = finished | done_now
        if step == 0:
            sync()
            if _stats is not None:
                _stats["prefill_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
        yield StepEvent(tokens=tok, finished=finished.clone(), step=step)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if _stats is not None:
            _stats["decode_steps"] = _stats.get("decode_steps", 0) + 1
        lengths_host = [n + 1 for n in lengths_host]
        if graphed is not None:
            logits = graphed.step(tok, max(lengths_host))
        else:
            logits = forward_last_logits(model, tok.view(B, 1), cache)
    sync()
    if _stats is not None:
        _stats["decode_s"] = time.perf_counter() - t0
        _stats["history"], _stats["reasons"] = history, reasons
        _stats["cuda_graph"] = graphed is not None and not graphed.failed and bool(graphed.graphs)


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[StepEvent], None] | None = None,
    cache: HybridCache | None = None,
    max_len: int | None = None,
    cuda_graph: bool | None = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens for each prompt of a batch.

    Args:
        model: a ``KimiLinearForCausalLM`` (``.model`` stack, ``.lm_head``, ``.config``).
        input_ids: ``[B, T]`` (or ``[T]``) int, prompts left-padded to a common length.
        attention_mask: ``[B, T]``, 1 = token, 0 = left padding (None: no padding).
        do_sample, temperature, top_k, top_p, repetition_penalty: see :class:`SamplingConfig`
            (greedy by default).
        eos_token_id: id(s) that end a row (the id is kept in its output). Default: none.
        stop_sequences: token-id lists that end a row once generated (kept in the output).
        pad_token_id: fills finished rows (default ``config.pad_token_id`` or 0).
        seed / generator: reproducible sampling.
        streamer: called with each :class:`StepEvent` as soon as the step's tokens are known.
        cache: reuse a :class:`HybridCache` (e.g. continue a conversation); default a fresh one sized
            ``max(prompt) + max_new_tokens`` (or ``max_len``).
        cuda_graph: replay the decode step from CUDA graphs (default: on for CUDA models).

    Raises:
        ValueError / TypeError: empty prompts, ids outside the vocabulary, a batch that does not match
            ``cache``, a prompt + budget longer than the cache; nothing has been written then.
    """
    stats: dict = {}
    for event in stream_generate(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, stop_sequences=stop_sequences, pad_token_id=pad_token_id, seed=seed,
        generator=generator, cache=cache, max_len=max_len, cuda_graph=cuda_graph, _stats=stats,
    ):
        if streamer is not None:
            streamer(event)
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    B = ids.shape[0]
    history = stats.get("history", [[] for _ in range(B)])
    reasons = stats.get("reasons", ["length"] * B)
    pad = int(pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0))
    n = max((len(h) for h in history), default=0)
    new = torch.full((B, n), pad, dtype=torch.long)
    for b, h in enumerate(history):
        new[b, : len(h)] = torch.tensor(h, dtype=torch.long)
    return GenerationOutput(
        sequences=torch.cat([ids.long().cpu(), new], dim=1), new_tokens=history, finish_reason=reasons,
        prefill_s=stats.get("prefill_s", 0.0), decode_s=stats.get("decode_s", 0.0),
        decode_steps=stats.get("decode_steps", 0), cuda_graph=stats.get("cuda_graph", False), cache=stats.get("cache"),
    )
