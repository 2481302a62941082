"""benchmarks/kernel_resources.py compiles kernels for sm_90a on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compile_env() -> dict[str, str]:
    """Environment for a fresh process that compiles for sm_90a (skips without Triton's ptxas): no
    TRITON_INTERPRET (the kernel tests' conftest sets it in this one, and interpreted kernels cannot
    be compiled), the repository on the path."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_kernel_resources_reports_registers():
    env = compile_env()
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "conv decode"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    regs = int(line.split(": ")[1].split(" registers")[0])
    assert line.startswith("conv decode step") and 0 < regs <= 255 and "spill" in line


def test_every_listed_kernel_compiles_for_sm90():
    # The real compiler is stricter than the interpreter the CPU kernel tests run (e.g. a global read
    # inside a kernel must be a `tl.constexpr(...)` instance: an annotated global passed the interpreter
    # and failed here). Every kernel and launch variant kernel_resources lists, compiled for sm_90a
    # (~30 s from a cold cache).
    env = compile_env()
    script = ("import sys; sys.path.insert(0, 'benchmarks'); import kernel_resources as kr; "
              "print(sum(1 for _ in kr.cases()))")
    n_cases = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                                 cwd=ROOT, timeout=120, check=True).stdout.strip())
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if " registers" in ln]
    assert len(lines) == n_cases >= 20, (len(lines), n_cases, out.stdout[-1500:])


def test_latent_split_prefetch_comes_before_the_pdl_wait():
    # The keys-major split kernel with TILES["prefetch_tiles"]: its bulk L2 prefetches must be issued
    # before griddepcontrol.wait (else they add nothing over the TMA loads) and none of its loads may be,
    # but the sequence length the prefetch needs (a read before the wait could see the query absorption's
    # output half-written: ops/pdl.py); without the switch there is no prefetch. Compiled for sm_90a in a
    # fresh process.
    env = compile_env()
    script = (
        "import sys; sys.path.insert(0, 'benchmarks'); import kernel_resources as kr\n"
        "from kimi_linear.ops import latent_attention_triton as lat\n"
        "for n in (0, 1, 2):\n"
        "    k = kr.compile_sm90(lat._latent_attn_split_keys_major_kernel, dict(R=512, DR=64, BLOCK_M=32, BLOCK_N=64,"
        " TMA=True, PREFETCH_TILES=n, ELT=2), 4, 2)\n"
        "    ptx = k.asm['ptx']; pre = ptx[:ptx.index('griddepcontrol.wait')]\n"
        "    print(n, pre.count('cp.async.bulk.prefetch.L2'), ptx.count('cp.async.bulk.prefetch.L2'),"
        " pre.count('ld.global'), pre.count('cp.async.bulk.tensor'))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {int(r.split()[0]): [int(x) for x in r.split()[1:]] for r in out.stdout.strip().splitlines()}
    assert rows[0] == [0, 0, 0, 0], rows
    for n in (1, 2):
        before, total, loads_before, tma_before = rows[n]
        assert before == total >= 1, rows
        # the only global load before the wait is the split's sequence length, which the prefetch needs
        assert loads_before == 1 and tma_before == 0, rows
