"""``kimi-linear info``: versions, devices and the backends each op would use here."""

from __future__ import annotations

import argparse
import platform


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print versions, devices and active backends")
    p.set_defaults(handler=run)


def collect() -> dict[str, object]:
    import torch

    from kimi_linear import __version__
    from kimi_linear.backends import resolve_backend, triton_interpret, triton_version

    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {prop.name} ({prop.total_memory / 2**30:.0f} GiB, {prop.multi_processor_count} SMs)")
    default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "kimi-linear": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch build)": torch.version.cuda,
        "triton": triton_version() or "not installed",
        "triton interpreter": triton_interpret(),
        "devices": devices,
        f"KDA backend on {default_device.type}": resolve_backend("auto", default_device),
    }


def run(args: argparse.Namespace) -> int:
    for key, value in collect().items():
        if isinstance(value, list):
            print(f"{key + ':':28s}{value[0]}")
            for item in value[1:]:
                print(f"{'':28s}{item}")
        else:
            print(f"{key + ':':28s}{value}")
    return 0
