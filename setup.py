"""Builds softmax_ce_ext._C: a CUDAExtension when a CUDA toolkit matching torch's CUDA is found, else a
CppExtension.  FORCE_CUDA=1 / FORCE_CPU=1 override the choice; the build prints what it chose and why."""

import os
import re
import shutil
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# Turing (T4, RTX 20: the oldest CUDA 13 compiles for), Ampere and Hopper machine code, plus PTX that newer GPUs
# can JIT.  Ada (8.9) runs Ampere's code; Volta and older need a CUDA 12 toolkit, and a torch built for it.
DEFAULT_ARCHS = "7.5;8.0;9.0+PTX"


def say(msg):
    print(f"[softmax_ce_ext build] {msg}", file=sys.stderr, flush=True)


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """Returns (path or None, why).  Must run before torch.utils.cpp_extension is imported: it reads
    CUDA_HOME once, and its own guess from a /usr/local/bin/nvcc wrapper script is /usr/local (wrong)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda", "/usr/local/cuda/bin/nvcc exists"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        return str(real.parent.parent), f"nvcc on PATH ({real})"
    return None, "no nvcc found (set CUDA_HOME to a CUDA toolkit)"


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def choose_backend(torch):
    """Returns (use_cuda, why, cuda_home)."""
    if flag("FORCE_CPU"):
        return False, "FORCE_CPU=1", None
    cuda_home, where = find_cuda_home()
    forced = flag("FORCE_CUDA")
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        problem = where
    else:
        found = nvcc_version(cuda_home)
        want = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
        if found is None:
            problem = f"could not run {cuda_home}/bin/nvcc --version"
        elif found[0] != want[0]:
            problem = f"nvcc {found[0]}.{found[1]} at {cuda_home} does not match torch's CUDA {torch.version.cuda}"
    if problem:
        if forced:
            raise SystemExit(f"[softmax_ce_ext build] FORCE_CUDA=1 but {problem}")
        return False, problem, None
    why = "FORCE_CUDA=1" if forced else f"CUDA toolkit at {cuda_home} ({where}) matches torch's CUDA {torch.version.cuda}"
    return True, why, cuda_home


def openmp_flags():
    """Returns (flags, why).  at::parallel_for is a header template over OpenMP: without -fopenmp its pragma is
    ignored and every CPU kernel runs on one thread.  A compiler that refuses -fopenmp (Apple's clang) builds the
    kernels single-threaded rather than not at all (SCE_OPENMP=0 asks for that)."""
    if os.environ.get("SCE_OPENMP") == "0":
        return [], "SCE_OPENMP=0: the CPU kernels run on one thread"
    cxx = shlex.split(os.environ.get("CXX", "c++"))  # the compiler cpp_extension's ninja build runs
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp.cpp"
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run(cxx + ["-fopenmp", str(src), "-o", str(Path(tmp) / "omp")],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    if ok:
        return ["-fopenmp"], "OpenMP: the CPU kernels run on torch's threads"
    return [], f"{' '.join(cxx)} cannot build with -fopenmp: the CPU kernels run on one thread"


def cuda_archs(torch):
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "$TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps), "the visible GPUs"
    return DEFAULT_ARCHS, "no GPU visible: the default list"


def extensions():
    import torch

    use_cuda, why, cuda_home = choose_backend(torch)
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # The AVX2 / AVX-512 files set their own instruction set (#pragma), so the default flags stay portable; the
    # baseline file's plain vectors compile to the default's (NEON on ARM64, SSE2 on x86-64).
    sources = ["csrc/softmax_ce.cpp", "csrc/cpu/softmax_ce_kernel.cpp", "csrc/cpu/softmax_ce_kernel_avx2.cpp",
               "csrc/cpu/softmax_ce_kernel_avx512.cpp", "csrc/cpu/softmax_ce_kernel_baseline.cpp"]
    openmp, openmp_why = openmp_flags()
    cxx = ["-O3"] + openmp
    # The torch it is built against: _ops.py names it if the kernels fail to load under another.
    info = {"backend": "cuda" if use_cuda else "cpu", "why": why, "archs": "", "torch": torch.__version__,
            "openmp": bool(openmp)}
    if use_cuda:
        archs, arch_why = cuda_archs(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        info["archs"] = archs
        # One translation unit per logits dtype (softmax_ce_kernel_<dtype>.cu) and the ops' registration in C++
        # (softmax_ce_ops.cpp): ninja compiles them in parallel.
        cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").iterdir()
                              if p.suffix in (".cu", ".cpp"))
        jobs = f"MAX_JOBS={os.environ['MAX_JOBS']}" if os.environ.get("MAX_JOBS") else "its default: cores + 2"
        say(f"building CUDA + CPU kernels ({why}); archs {archs} ({arch_why}); {len(cuda_sources)} files in "
            f"csrc/cuda, compiled in parallel by ninja ({jobs} at once)")
        nvcc = ["-O3", "-lineinfo"] + (["-Xptxas=-v"] if flag("SCE_PTXAS_VERBOSE") else [])
        ext = CUDAExtension(
            "softmax_ce_ext._C",
            sources + cuda_sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=openmp,
        )
    else:
        say(f"building CPU-only kernels: {why}")
        ext = CppExtension("softmax_ce_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    say(openmp_why)
    (ROOT / "softmax_ce_ext" / "_build_info.py").write_text(f"# Written by setup.py.\nBUILD = {info!r}\n")
    return [ext]


def main():
    ext_modules = extensions()  # first: it fixes CUDA_HOME before cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["softmax_ce_ext", "softmax_ce_ext.*"]),
        package_data={"softmax_ce_ext": ["py.typed"]},  # the public functions are typed (PEP 561)
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension},
    )


main()
