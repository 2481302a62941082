"""The inference cache of the hybrid model: constant-size KDA states and a compressed MLA latent cache.

Per KDA layer (size independent of the context length):

| buffer             | shape                     | dtype        | what                                       |
|--------------------|---------------------------|--------------|--------------------------------------------|
| ``conv_q/k/v``     | ``[B, D, W - 1]``         | model dtype  | last ``W - 1`` inputs of each short conv   |
| ``state``          | ``[B, HV, K, V]``         | float32      | the delta-rule memory ``S_t``              |

Per MLA layer (grows with the context, preallocated to ``max_len``):

| buffer             | shape                     | dtype        | what                                       |
|--------------------|---------------------------|--------------|--------------------------------------------|
| ``latent``         | ``[B, max_len, R]``       | model dtype  | normalised KV latent (``R = kv_lora_rank``) |
| ``k_rope``         | ``[B, max_len, Dr]``      | model dtype  | shared rope-less key part (``Dr = qk_rope_head_dim``) |

Nothing is decompressed: decode reads the latent through the absorbed projections
(:mod:`kimi_linear.ops.latent_attention`). Rows are compacted: row ``b`` keeps its ``lengths[b]``
valid tokens at positions ``[0, lengths[b])`` whatever left padding its prompt had, so decode writes
token ``t`` of row ``b`` at ``lengths[b]`` and attention masks by length alone.

A forward pass over ``T`` new tokens is one *step*: the model calls :meth:`HybridCache.begin_step`
(validates everything before any buffer is touched, so a rejected input leaves the cache usable),
the layers read ``cache.step`` and write their own buffers, and the model calls
:meth:`HybridCache.commit_step` to advance ``lengths``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kimi_linear.ops.norm import rms_norm_store_

KDA = "kda"
MLA = "mla"


@dataclass(frozen=True)
class KDACacheSpec:
    """Sizes of one KDA layer's cache: ``HV`` value heads, key dim ``K``, value dim ``V``,
    short-conv widths ``conv_dims = (Dq, Dk, Dv)`` and kernel size ``conv_kernel`` (window ``W - 1``)."""

    num_heads: int
    head_k: int
    head_v: int
    conv_dims: tuple[int, int, int]
    conv_kernel: int

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_k", "head_v", "conv_kernel"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"KDACacheSpec.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.conv_dims) != 3 or min(self.conv_dims) < 1:
            raise ValueError(f"KDACacheSpec.conv_dims must be three positive widths (q, k, v), got {self.conv_dims}")


@dataclass(frozen=True)
class MLACacheSpec:
    """Sizes of one MLA layer's cache: latent width ``kv_lora_rank`` and shared key part ``qk_rope_head_dim``."""

    kv_lora_rank: int
    qk_rope_head_dim: int

    def __post_init__(self) -> None:
        if self.kv_lora_rank < 1 or self.qk_rope_head_dim < 0:
            raise ValueError(
                f"MLACacheSpec needs kv_lora_rank >= 1 and qk_rope_head_dim >= 0, got "
                f"{self.kv_lora_rank}, {self.qk_rope_head_dim}"
            )


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kda_bytes_per_sequence(spec: KDACacheSpec, dtype: torch.dtype) -> int:
    """Bytes one KDA layer keeps per sequence: conv windows (model dtype) + fp32 state."""
    conv = sum(spec.conv_dims) * (spec.conv_kernel - 1) * _elt(dtype)
    return conv + spec.num_heads * spec.head_k * spec.head_v * 4


def mla_bytes_per_token(spec: MLACacheSpec, dtype: torch.dtype) -> int:
    """Bytes one MLA layer keeps per cached token: latent + shared key part."""
    return (spec.kv_lora_rank + spec.qk_rope_head_dim) * _elt(dtype)


def cache_bytes(
    layer_kinds: list[str] | tuple[str, ...],
    *,
    batch_size: int,
    context: int,
    kda: KDACacheSpec | None,
    mla: MLACacheSpec | None,
    dtype: torch.dtype,
) -> dict[str, int]:
    """Cache size of a stack without allocating it (benchmarks and capacity planning).

    Returns ``{"kda_layers", "mla_layers", "bytes_per_token", "bytes_per_sequence_fixed", "total"}``:
    ``bytes_per_token`` is what every cached token costs over all MLA layers; the fixed part is what
    every sequence costs over all KDA layers whatever its length.
    """
    n_kda = sum(1 for k in layer_kinds if k == KDA)
    n_mla = sum(1 for k in layer_kinds if k == MLA)
    per_tok = n_mla * mla_bytes_per_token(mla, dtype) if n_mla else 0
    fixed = n_kda * kda_bytes_per_sequence(kda, dtype) if n_kda else 0
    return {
        "kda_layers": n_kda,
        "mla_layers": n_mla,
        "bytes_per_token": per_tok,
        "bytes_per_sequence_fixed": fixed,
        "total": batch_size * (fixed + context * per_tok),
    }


@dataclass
class KDALayerCache:
    """One KDA layer's buffers (shapes in the module docstring)."""

    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    state: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_q, self.conv_k, self.conv_v, self.state]

    @property
    def convs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.conv_q, self.conv_k, self.conv_v


@dataclass
class MLALayerCache:
    """One MLA layer's buffers (shapes in the module docstring)."""

    latent: torch.Tensor
    k_rope: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent, self.k_rope]

    def _check_write(self, latent: torch.Tensor, k_rope: torch.Tensor, step: CacheStep) -> None:
        B, T = step.batch_size, step.num_tokens
        if latent.shape != (B, T, self.latent.shape[-1]) or k_rope.shape != (B, T, self.k_rope.shape[-1]):
            raise ValueError(
                f"MLA cache write expects latent [B={B}, T={T}, {self.latent.shape[-1]}] and k_rope "
                f"[B, T, {self.k_rope.shape[-1]}], got {tuple(latent.shape)} and {tuple(k_rope.shape)}"
            )

    def write(self, latent: torch.Tensor, k_rope: torch.Tensor, step: CacheStep) -> None:
        """Store this step's new tokens. ``latent [B, T, R]``, ``k_rope [B, T, Dr]``; padded tokens are dropped."""
        self._check_write(latent, k_rope, step)
        if step.decode:  # one token per row, no padding: a scatter with no host sync (graph-capturable)
            rows = step.decode_rows_lengths[0]
            self.latent[rows, step.start] = latent[:, 0].to(self.latent.dtype)
            self.k_rope[rows, step.start] = k_rope[:, 0].to(self.k_rope.dtype)
            return
        rows, cols = step.valid_index
        pos = step.positions[rows, cols]
        self.latent[rows, pos] = latent[rows, cols].to(self.latent.dtype)
        self.k_rope[rows, pos] = k_rope[rows, cols].to(self.k_rope.dtype)

    def write_decode_normed(self, latent: torch.Tensor, k_rope: torch.Tensor, norm: Any, step: CacheStep) -> None:
        """Decode only: :meth:`write` of ``(norm(latent), k_rope)`` (``latent [B, 1, R]`` before the latent
        norm, ``norm`` an :class:`~kimi_linear.layers.common.RMSNorm`) in one launch on the kernel path:
        the norm writes straight into the cache (:func:`kimi_linear.ops.norm.rms_norm_store_`)."""
        if not step.decode:
            raise ValueError("write_decode_normed is for decode steps (one token per row, no padding)")
        self._check_write(latent, k_rope, step)
        rms_norm_store_(latent[:, 0], norm.weight, norm.eps, self.latent, step.start,
                        copy=(k_rope[:, 0], self.k_rope), backend=norm.backend)

    def view(self, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything cached for this step's keys after :meth:`write`: ``latent [B, L, R]``, ``k_rope [B, L, Dr]``
        with ``L = step.key_len``; mask them with ``step.key_mask``."""
        L = step.key_len
        return self.latent[:, :L], self.k_rope[:, :L]


@dataclass
class CacheStep:
    """Where the ``T`` tokens of one forward go in the cache (built by :meth:`HybridCache.begin_step`).

    | field       | shape / type | meaning                                                        |
    |-------------|--------------|----------------------------------------------------------------|
    | start       | ``[B]`` int64 | tokens cached per row before this step                        |
    | num_new     | ``[B]`` int64 | valid (non-padding) tokens of this step per row               |
    | pad         | ``[B]`` int64 | left-padding tokens of this step per row                      |
    | positions   | ``[B, T]``   | cache position of each token (0 for padding)                   |
    | decode      | bool         | ``T == 1`` and no padding: the fast, sync-free path            |
    | fresh       | bool         | nothing cached in any row yet (a first prefill)                |
    | key_len     | int          | keys to attend over: ``max(start + num_new)`` (``max_len`` in decode) |
    """

    start: torch.Tensor
    num_new: torch.Tensor
    pad: torch.Tensor
    positions: torch.Tensor
    token_mask: torch.Tensor | None
    decode: bool
    key_len: int
    fresh: bool = False
    _valid_index: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _key_mask: torch.Tensor | None = field(default=None, repr=False)
    _decode_rows_lengths: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def decode_rows_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode only: ``(arange(B), start + 1)``, the rows a token is written to and the cached lengths
        after it; made once per step and shared by every MLA layer (two launches each otherwise)."""
        if self._decode_rows_lengths is None:
            self._decode_rows_lengths = (torch.arange(self.batch_size, device=self.start.device), self.start + 1)
        return self._decode_rows_lengths

    @property
    def batch_size(self) -> int:
        return self.start.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def valid_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` of the non-padding tokens of this step."""
        if self._valid_index is None:
            if self.token_mask is None:
                B, T = self.positions.shape
                rows = torch.arange(B, device=self.start.device).repeat_interleave(T)
                cols = torch.arange(T, device=self.start.device).repeat(B)
                self._valid_index = (rows, cols)
            else:
                self._valid_index = tuple(self.token_mask.nonzero(as_tuple=True))
        return self._valid_index

    @property
    def key_mask(self) -> torch.Tensor:
        """``[B, T, key_len]`` bool: token ``t`` of row ``b`` may attend to cache position ``j``.

        Causal by cache position (``j <= positions[b, t]``). A padding token sees position 0 only, so its
        (discarded) output stays finite.
        """
        if self._key_mask is None:
            j = torch.arange(self.key_len, device=self.start.device)
            self._key_mask = j.view(1, 1, -1) <= self.positions.unsqueeze(-1)
        return self._key_mask


class HybridCache:
    """Caches of every layer of a hybrid KDA / MLA stack, for ``batch_size`` sequences up to ``max_len`` tokens.

    ``layers[i]`` is a :class:`KDALayerCache` or an :class:`MLALayerCache` (None for a layer with no
    cache, e.g. ``"none"`` in ``layer_kinds``); ``lengths [B]`` counts the tokens each row has cached.
    """

    def __init__(
        self,
        layer_kinds: list[str] | tuple[str, ...],
        layers: list[KDALayerCache | MLALayerCache | None],
        lengths: torch.Tensor,
        max_len: int,
        kda: KDACacheSpec | None,
        mla: MLACacheSpec | None,
    ) -> None:
        self.layer_kinds = tuple(layer_kinds)
        self.layers = layers
        self.lengths = lengths
        self.max_len = max_len
        self.kda_spec = kda
        self.mla_spec = mla
        self.step: CacheStep | None = None
        # row b of a batch owns slot b of every KDA state pool; made once, not per layer and step
        self.slot_index = torch.arange(lengths.shape[0], device=lengths.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def allocate(
        cls,
        layer_kinds: list[str] | tuple[str, ...],
        *,
        batch_size: int,
        max_len: int,
        kda: KDACacheSpec | None = None,
        mla: MLACacheSpec | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> HybridCache:
        """Zero-filled buffers for ``layer_kinds`` (each ``"kda"``, ``"mla"`` or ``"none"``)."""
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got batch_size={batch_size}, max_len={max_len}")
        kinds = tuple(layer_kinds)
        bad = [k for k in kinds if k not in (KDA, MLA, "none")]
        if bad:
            raise ValueError(f"layer kinds must be 'kda', 'mla' or 'none', got {bad}")
        if KDA in kinds and kda is None:
            raise ValueError("the stack has KDA layers but no KDACacheSpec was given")
        if MLA in kinds and mla is None:
            raise ValueError("the stack has MLA layers but no MLACacheSpec was given")
        device = torch.device(device)
        layers: list[KDALayerCache | MLALayerCache | None] = []
        for kind in kinds:
            if kind == KDA:
                w = kda.conv_kernel - 1
                dq, dk, dv = kda.conv_dims
                layers.append(KDALayerCache(
                    conv_q=torch.zeros(batch_size, dq, w, device=device, dtype=dtype),
                    conv_k=torch.zeros(batch_size, dk, w, device=device, dtype=dtype),
                    conv_v=torch.zeros(batch_size, dv, w, device=device, dtype=dtype),
                    state=torch.zeros(batch_size, kda.num_heads, kda.head_k, kda.head_v, device=device,
                                      dtype=torch.float32),
                ))
            elif kind == MLA:
                layers.append(MLALayerCache(
                    latent=torch.zeros(batch_size, max_len, mla.kv_lora_rank, device=device, dtype=dtype),
                    k_rope=torch.zeros(batch_size, max_len, mla.qk_rope_head_dim, device=device, dtype=dtype),
                ))
            else:
                layers.append(None)
        lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return cls(kinds, layers, lengths, max_len, kda, mla)

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer, ``lengths`` last (a fixed order: reset/select/copy walk it)."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            if layer is not None:
                out.extend(layer.tensors())
        out.append(self.lengths)
        return out

    def check_batch(self, batch_size: int, what: str = "input") -> None:
        """Raise ValueError unless ``batch_size`` equals the cache's batch."""
        if batch_size != self.batch_size:
            raise ValueError(
                f"{what} has batch size {batch_size} but the cache holds {self.batch_size} sequences; "
                f"allocate a cache of that batch or select rows with cache.select(index)"
            )

    # ------------------------------------------------------------------ steps
    def begin_step(
        self, num_tokens: int, attention_mask: torch.Tensor | None = None, *, key_len: int | None = None
    ) -> CacheStep:
        """Validate and plan a forward over ``num_tokens`` new tokens per row; sets ``self.step``.

        ``attention_mask [B, T]`` (1 = token, 0 = padding) may only pad on the left, and only rows that
        have nothing cached yet (padding inside a sequence would feed zeros into its conv window and
        decay its state). Nothing is modified when this raises.

        ``key_len`` (decode only) fixes how many cache positions attention spans, without reading
        ``lengths`` on the host: a CUDA-graph caller passes a static bucket and guarantees
        ``lengths < key_len <= max_len`` itself. Left None, it is ``max(lengths) + 1`` and checked.
        """
        if self.step is not None:
            raise RuntimeError("a cache step is already open; call commit_step() (or abort_step()) first")
        B, T = self.batch_size, int(num_tokens)
        if T < 1:
            raise ValueError(f"a forward with a cache needs at least one token, got T={T}")
        dev = self.device
        start = self.lengths
        if attention_mask is None:
            num_new = torch.full((B,), T, dtype=torch.int64, device=dev)
            pad = torch.zeros(B, dtype=torch.int64, device=dev)
            token_mask = None
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != T:
                raise ValueError(f"attention_mask must be [B, T={T}], got shape {tuple(attention_mask.shape)}")
            self.check_batch(attention_mask.shape[0], "attention_mask")
            token_mask = attention_mask.to(device=dev).bool()
            num_new = token_mask.sum(dim=1)
            pad = T - num_new
            left = torch.arange(T, device=dev).unsqueeze(0) >= pad.unsqueeze(1)
            if not torch.equal(left, token_mask):
                raise ValueError("attention_mask must pad on the left only (zeros, then ones, in every row)")
            if bool(((pad > 0) & (start > 0)).any()):
                raise ValueError(
                    "padding is only allowed in a row's first chunk (rows with cached tokens: "
                    f"{start.tolist()}, padding: {pad.tolist()})"
                )
            if bool((num_new == 0).any()):
                raise ValueError(f"every row needs at least one token; tokens per row: {num_new.tolist()}")
            if bool(pad.eq(0).all()):
                token_mask = None
        decode = T == 1 and token_mask is None
        fresh = False
        if decode and key_len is not None:
            if not 1 <= key_len <= self.max_len:
                raise ValueError(f"key_len must lie in [1, max_len={self.max_len}], got {key_len}")
        elif decode:
            key_len = int(start.max()) + 1
            if key_len > self.max_len:
                raise ValueError(
                    f"the cache is full: max_len={self.max_len} tokens per row, cached {start.tolist()}"
                )
        else:
            end = start + num_new
            key_len = int(end.max())
            fresh = int(start.max()) == 0
            if key_len > self.max_len:
                raise ValueError(
                    f"the cache holds at most max_len={self.max_len} tokens per row, but this step would "
                    f"reach {key_len} (cached {start.tolist()}, new {num_new.tolist()})"
                )
        t = torch.arange(T, device=dev).unsqueeze(0)
        positions = (start.unsqueeze(1) + t - pad.unsqueeze(1)).clamp_min(0)
        if token_mask is not None:
            positions = positions.masked_fill(~token_mask, 0)
        self.step = CacheStep(start=start.clone(), num_new=num_new, pad=pad, positions=positions,
                              token_mask=token_mask, decode=decode, key_len=key_len, fresh=fresh)
        return self.step

    def commit_step(self) -> None:
        """Advance ``lengths`` by the step's valid tokens and close the step."""
        if self.step is None:
            raise RuntimeError("no cache step is open")
        self.lengths.add_(self.step.num_new)
        self.step = None

    def abort_step(self) -> None:
        """Close an open step without advancing (a failed forward; buffers written past ``lengths`` are
        invisible because attention masks by length and the next step overwrites them)."""
        self.step = None

    # ------------------------------------------------------------------ whole-cache operations
    def reset(self) -> None:
        """Zero every buffer and every length, in place (buffers keep their addresses: CUDA graphs stay valid)."""
        self.step = None
        for t in self.tensors():
            t.zero_()

    def reorder_(self, index: torch.Tensor) -> None:
        """In place: row ``b`` becomes old row ``index[b]`` (beam search). ``index`` is ``[B]`` int."""
        index = self._check_index(index, same_batch=True)
        for t in self.tensors():
            t.copy_(t.index_select(0, index))

    def select(self, index: torch.Tensor | list[int]) -> HybridCache:
        """A new cache holding rows ``index`` (any length, repeats allowed), bit-exact copies."""
        index = self._check_index(index, same_batch=False)
        return self._rebuild(lambda t: t.index_select(0, index).contiguous())

    def clone(self) -> HybridCache:
        """A bit-exact, independent copy."""
        return self._rebuild(lambda t: t.clone())

    def copy_(self, other: HybridCache) -> None:
        """Copy ``other``'s contents into this cache's buffers (same layout), in place."""
        if other.layer_kinds != self.layer_kinds or other.max_len != self.max_len:
            raise ValueError(
                f"cache layouts differ: kinds {other.layer_kinds} / max_len {other.max_len} vs "
                f"{self.layer_kinds} / {self.max_len}"
            )
        self.check_batch(other.batch_size, "the source cache")
        for dst, src in zip(self.tensors(), other.tensors()):
            dst.copy_(src)

    def _rebuild(self, fn) -> HybridCache:
        layers: list[KDALayerCache | MLALayerCache | None] = []
        for layer in self.layers:
            if layer is None:
                layers.append(None)
            elif isinstance(layer, KDALayerCache):
                layers.append(KDALayerCache(*(fn(t) for t in layer.tensors())))
            else:
                layers.append(MLALayerCache(*(fn(t) for t in layer.tensors())))
        return HybridCache(self.layer_kinds, layers, fn(self.lengths), self.max_len, self.kda_spec, self.mla_spec)

    def _check_index(self, index: torch.Tensor | list[int], same_batch: bool) -> torch.Tensor:
        index = torch.as_tensor(index, device=self.device)
        if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index must be a 1-D integer tensor of rows, got shape {tuple(index.shape)}, {index.dtype}")
        if same_batch:
            self.check_batch(index.shape[0], "index")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch_size):
            raise ValueError(f"row indices must lie in [0, {self.batch_size}), got {index.tolist()}")
        return index.long()

    # ------------------------------------------------------------------ accounting
    def memory(self) -> dict[str, object]:
        """Bytes held, by layer kind, per token and in total.

        ``{"kda": {"layers", "bytes_per_sequence", "bytes"}, "mla": {"layers", "bytes_per_token",
        "bytes_allocated", "bytes_used"}, "bytes_per_token", "total_allocated", "total_used"}``, where
        ``bytes_per_token`` is the cost of one more cached token over all MLA layers and "used" counts
        only the ``lengths`` tokens each row holds.
        """
        dtype = next((t.dtype for layer in self.layers if isinstance(layer, MLALayerCache)
                      for t in layer.tensors()), None)
        kda_layers = [layer for layer in self.layers if isinstance(layer, KDALayerCache)]
        mla_layers = [layer for layer in self.layers if isinstance(layer, MLALayerCache)]
        kda_bytes = sum(t.numel() * t.element_size() for layer in kda_layers for t in layer.tensors())
        mla_alloc = sum(t.numel() * t.element_size() for layer in mla_layers for t in layer.tensors())
        per_tok_layer = mla_bytes_per_token(self.mla_spec, dtype) if mla_layers else 0
        used_tokens = int(self.lengths.sum())
        return {
            "kda": {
                "layers": len(kda_layers),
                "bytes_per_sequence": kda_bytes // self.batch_size if kda_layers else 0,
                "bytes": kda_bytes,
            },
            "mla": {
                "layers": len(mla_layers),
                "bytes_per_token": per_tok_layer,
                "bytes_allocated": mla_alloc,
                "bytes_used": used_tokens * per_tok_layer * len(mla_layers),
            },
            "bytes_per_token": per_tok_layer * len(mla_layers),
            "total_allocated": kda_bytes + mla_alloc,
            "total_used": kda_bytes + used_tokens * per_tok_layer * len(mla_layers),
        }

    def __repr__(self) -> str:
        return (f"HybridCache(batch={self.batch_size}, max_len={self.max_len}, kinds={''.join(k[0] for k in self.layer_kinds)}, "
                f"lengths={self.lengths.tolist()})")


def specs_from_config(config) -> tuple[list[str], KDACacheSpec | None, MLACacheSpec | None]:
    """Layer kinds and cache specs of a :class:`kimi_linear.model.config.KimiLinearConfig`."""
    kinds = list(config.layer_types())
    kda = None
    if KDA in kinds:
        H, K = config.kda_num_heads, config.kda_head_dim
        kda = KDACacheSpec(num_heads=H, head_k=K, head_v=K, conv_dims=(H * K, H * K, H * K),
                           conv_kernel=config.conv_kernel_size)
    mla = MLACacheSpec(config.kv_lora_rank, config.qk_rope_head_dim) if MLA in kinds else None
    return kinds, kda, mla


def cache_for_config(
    config, *, batch_size: int, max_len: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> HybridCache:
    """A zeroed :class:`HybridCache` for a model configuration (``dtype``: the model's compute dtype)."""
    kinds, kda, mla = specs_from_config(config)
    return HybridCache.allocate(kinds, batch_size=batch_size, max_len=max_len, kda=kda, mla=mla, device=device,
                                dtype=dtype)
