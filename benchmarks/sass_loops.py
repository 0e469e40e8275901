"""Instruction counts of the CUDA kernels' loops, read from the compiled SASS: what a session without a GPU can
measure (NOTES.md, v0.9-dev).  Compiles one logits dtype's CUDA file (csrc/cuda/softmax_ce_kernel_<dtype>.cu,
bfloat16 by default) for one arch (sm_90a by default, ~1 min),
disassembles it with cuobjdump (the CUDA toolkit's, else the copy bundled with triton) and prints, for each
kernel whose mangled name matches the pattern, every backward branch as a loop: its length in instructions and
their kinds.  A loop body that the compiler unrolled holds several chunks (count its LDS/LDG.128 or MUFU).

    python benchmarks/sass_loops.py 'slice_rows_kernelIN3c108BFloat16ELb0ELb1E'   # lean bf16 slices
    python benchmarks/sass_loops.py stream_rows --dtype f32                        # float32 streaming rows
    python benchmarks/sass_loops.py stream_rows --cubin /tmp/k.cubin              # reuse a cubin
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # before torch guesses it from an nvcc wrapper on the PATH
import torch.utils.cpp_extension as ext  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def tool(name):
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in (Path(cuda) / "bin" / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    sys.exit(f"sass_loops: {name} not found (CUDA_HOME/bin, PATH, triton's bundled tools)")


def compile_cubin(arch, source, out):
    flags = [f"-I{p}" for p in ext.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = [tool("nvcc"), "-DWITH_CUDA", *flags, "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
           "-O3", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-std=c++20",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-o", str(out), str(source)]
    print(f"compiling {source.name} for sm_{arch} ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def functions(sass):
    """{mangled name: [(address, instruction text)]}"""
    out = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = block.split("\n", 1)
        out[name.strip()] = [(int(m.group(1), 16), m.group(2).strip()) for m in map(INSTR.match, body.split("\n")) if m]
    return out


def opcode(text):
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def loops(instrs):
    """(first, last, instructions) for each backward branch: the body from its target to the branch."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    for i, (a, text) in enumerate(instrs):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) <= a and int(target.group(1), 16) in index:
            yield int(target.group(1), 16), a, instrs[index[int(target.group(1), 16)]: i + 1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pattern", help="regular expression matched against the kernels' mangled names")
    p.add_argument("--arch", default="90a", help="compute capability to compile for (default 90a)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32", "f64"],
                   help="the logits dtype whose file to compile (default bf16)")
    p.add_argument("--cubin", type=Path, help="an existing cubin (else compiled to /tmp/softmax_ce_sass.cubin)")
    p.add_argument("--max-loop", type=int, default=400, help="skip loops longer than this (the per-row loop)")
    args = p.parse_args()
    cubin = args.cubin or Path("/tmp/softmax_ce_sass.cubin")
    if args.cubin is None:
        compile_cubin(args.arch, CUDA_DIR / f"softmax_ce_kernel_{args.dtype}.cu", cubin)
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    found = False
    for name, instrs in functions(sass).items():
        if not re.search(args.pattern, name):
            continue
        found = True
        print(f"{name}: {len(instrs)} instructions")
        for first, last, body in loops(instrs):
            if len(body) > args.max_loop:
                continue
            kinds = collections.Counter(opcode(t) for _, t in body)
            print(f"  loop {first:#07x}-{last:#07x}: {len(body):4d}  " +
                  " ".join(f"{k}:{v}" for k, v in kinds.most_common()))
    if not found:
        sys.exit(f"sass_loops: no kernel matches {args.pattern!r}")


if __name__ == "__main__":
    main()
