"""kimi-linear: Kimi Linear (arXiv 2510.26692) for training, inference and measurement.

Layers of the package (imports point downward only)::

    ops/        tensors in, tensors out (KDA references and Triton kernels, conv, norms, MoE routing)
    layers/     nn.Modules holding parameters (KDA, MLA, MoE)
    model/      config, the hybrid stack, official checkpoint format
    generation/ caches, prefill/decode, sampling
    train/      trainer, data, synthetic tasks
    bench/      benchmark registry and runners

Importing the package never imports Triton; kernels load it lazily on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
