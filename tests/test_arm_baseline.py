"""The `baseline` CPU kernels (plain vectors) built for ARM64 and run there: cross-compiled and run under QEMU where
the machine has the tools (`.ci/run` installs them), so that an x86-only construct in softmax_ce_simd.h fails here
and not on a user's Mac or Graviton.  The program (tests/arm/baseline_check.cpp) includes the kernels without torch
and checks them against float64, and the CPU's float16 conversions against the integer steps."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-aarch64")
SYSROOT = pathlib.Path("/usr/aarch64-linux-gnu")  # Debian's cross libraries, for either compiler
COMPILERS = {
    "gcc": [shutil.which("aarch64-linux-gnu-g++")],
    "clang": [shutil.which("clang++"), "--target=aarch64-linux-gnu"],
}


@pytest.mark.parametrize("compiler", sorted(COMPILERS))
def test_baseline_kernels_on_arm64(compiler, tmp_path):
    command = COMPILERS[compiler]
    if QEMU is None or command[0] is None or not SYSROOT.is_dir():
        pytest.skip(f"needs {compiler}'s ARM64 cross-compiler and qemu-aarch64 (apt: g++-aarch64-linux-gnu "
                    "qemu-user clang)")
    exe = tmp_path / "baseline_check"
    build = subprocess.run(command + ["-O2", "-std=c++17", "-static", f"-I{ROOT / 'csrc' / 'cpu'}",
                                      str(ROOT / "tests" / "arm" / "baseline_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([QEMU, str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == 10, run.stdout
