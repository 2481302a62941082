"""Benchmarks: provider registry (registry.py), shared timing / gate / result files (common.py),
the chunked KDA benchmark (kda.py), the decode benchmark (decode.py) and plots (plot.py).

Run them through the CLI: ``kimi-linear bench kda`` / ``kimi-linear bench kda-decode``.
"""
