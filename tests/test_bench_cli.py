"""The benchmark CLI: a quick CPU run writes JSON and CSV whose rows all pass their correctness check; bad
arguments give one line on stderr and exit code 2."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import softmax_ce_ext

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def bench(*args):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)


def test_quick_run_writes_json_and_csv(tmp_path):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    r = bench("--device", "cpu", "--shapes", "quick", "--mode", "fwd", "fwd+bwd", "none+bwd", "scaled+bwd",
              "--providers", "ours", "torch", "compile", "liger", "--reps", "3", "--ignore-frac", "0.2",
              "--label-smoothing", "0.1", "--json", str(out_json), "--csv", str(out_csv), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "copy bandwidth" in r.stdout and "floor:" in r.stdout
    data = json.loads(out_json.read_text())
    assert data["meta"]["copy_gbps"] > 0 and data["meta"]["torch"] == torch.__version__
    rows = data["rows"]
    assert len(rows) == 2 * 4 * 4  # shapes x modes x providers
    timed = [row for row in rows if row["status"] == "ok"]
    assert {row["provider"] for row in timed} == {"ours", "torch", "compile"}
    assert all(row["status"] == "skipped" and row["note"] for row in rows if row["provider"] == "liger")
    for row in timed:
        assert row["ok"] and row["ms"] > 0 and row["pct_floor"] > 0 and row["loss_err"] < 1e-4
        assert row["passes"] == {"fwd": 1, "fwd+bwd": 2, "none+bwd": 3, "scaled+bwd": 2}[row["mode"]]
        assert (row["grad_err"] is None) == (row["mode"] == "fwd")
        if row["provider"] == "torch":
            assert row["speedup_vs_torch"] == pytest.approx(1.0)
    with out_csv.open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"shape", "dtype", "mode", "provider", "ms", "pct_floor", "loss_err", "grad_err", "ok"} <= set(csv_rows[0])


def test_probability_targets(tmp_path):
    """--targets probabilities: soft labels in the logits' dtype, checked against float64 like class indices; one
    more pass in the floor (the targets are read); the fused peers that take class indices only are skipped."""
    out_json = tmp_path / "r.json"
    r = bench("--device", "cpu", "--shapes", "quick", "--dtype", "float32", "bfloat16", "--mode", "fwd", "fwd+bwd",
              "none+bwd", "--providers", "ours", "torch", "liger", "--reps", "3", "--label-smoothing", "0.1",
              "--targets", "probabilities", "--json", str(out_json), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out_json.read_text())
    assert data["meta"]["targets"] == "probabilities"
    rows = data["rows"]
    timed = [row for row in rows if row["status"] == "ok"]
    assert {row["provider"] for row in timed} == {"ours", "torch"} and len(timed) == 2 * 2 * 3 * 2
    for row in timed:
        assert row["ok"] and row["loss_err"] < 3e-2
        assert (row["grad_err"] is None) == (row["mode"] == "fwd")
        assert row["passes"] == {"fwd": 2, "fwd+bwd": 3, "none+bwd": 4}[row["mode"]]
    assert all(row["status"] == "skipped" and row["note"] for row in rows if row["provider"] == "liger")


@pytest.mark.parametrize("layout,shape", [("channels-last", "4x21x16x16"), ("transposed", "64x300")])
def test_logit_layouts(tmp_path, layout, shape):
    """--layout: channels-last K-dim logits, transposed N x C logits; timed and checked against float64 like the
    default layout."""
    out_json = tmp_path / "r.json"
    r = bench("--device", "cpu", "--shapes", shape, "--dtype", "float32", "--mode", "fwd", "fwd+bwd",
              "--providers", "ours", "torch", "--reps", "3", "--layout", layout, "--json", str(out_json),
              "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"logits layout: {layout}" in r.stdout
    data = json.loads(out_json.read_text())
    assert data["meta"]["layout"] == layout
    assert len(data["rows"]) == 4 and all(row["status"] == "ok" and row["ok"] for row in data["rows"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--shapes", "huge"], "unknown preset 'huge'"),
        (["--shapes", "8192xabc"], "malformed shape '8192xabc'"),
        (["--shapes", "8192"], "malformed shape '8192'"),
        (["--mode", "backwards"], "invalid choice"),
        (["--ignore-frac", "1.5"], "--ignore-frac must be in [0, 1)"),
        (["--targets", "probabilities", "--ignore-frac", "0.1"], "--ignore-frac needs class indices"),
        (["--shapes", "64x1000", "--layout", "channels-last"], "--layout channels-last needs K-dim shapes"),
        (["--shapes", "4x21x8x8", "--layout", "transposed"], "--layout transposed needs N x C shapes"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    r = bench("--device", "cpu", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_cuda_without_cuda_exits_2():
    if torch.cuda.is_available() and softmax_ce_ext.cuda_built():
        pytest.skip("CUDA is available here")
    r = bench("--device", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--device cuda" in r.stderr


def test_help_explains_the_byte_formula():
    r = bench("--help")
    assert r.returncode == 0
    assert "2*N*C*E" in r.stdout and "--providers" in r.stdout


def test_gpu_check_script_is_sound():
    """The one prepared GPU call cannot be debugged cheaply on the device: its shell parses, its smoke script
    compiles, and every provider, shape preset and part it names exists."""
    import re

    root = BENCH.parent
    script = (root / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(root / "gpu_check.sh")], capture_output=True).returncode == 0
    subprocess.run([sys.executable, "-m", "py_compile", str(root / "cuda_smoke.py")], check=True)
    sys.path.insert(0, str(root))
    try:
        from bench import PRESETS
        from providers import PROVIDERS
    finally:
        sys.path.remove(str(root))
    provider_lists = re.findall(r"--providers ([\w \\\n]+?) (?:--|2>&1)", script)
    assert len(provider_lists) == script.count("--providers"), provider_lists  # each list read, over its lines
    for names in provider_lists:
        assert set(names.replace("\\", " ").split()) <= set(PROVIDERS), names
    for presets in re.findall(r"--shapes ([\w ]+?) (?:\\|--)", script):
        assert all(p in PRESETS or p[0].isdigit() for p in presets.split()), presets
    parts = set(re.search(r'GPU_CHECK_PARTS="([\w ]+)"', script).group(1).split())
    assert parts == set(re.findall(r"^if part (\w+); then", script, re.M)), parts
    pytest_calls = re.findall(r"\$PY -m pytest[^\n]*", script)  # each one in the carried xdist's workers
    assert pytest_calls and all("$XDIST" in call for call in pytest_calls), pytest_calls
    for test_file in re.findall(r"tests/test_\w+\.py", script):
        assert (root.parent / test_file).exists(), test_file
    for py in set(re.findall(r"benchmarks/\w+\.py", script)):  # every script it runs exists and compiles
        subprocess.run([sys.executable, "-m", "py_compile", str(root.parent / py)], check=True)
    # ncu profiles as many launches as gpu_probe --ncu has cases (one main kernel each): fewer would drop the last
    sys.path.insert(0, str(root))
    try:
        from gpu_probe import NCU_CASES
    finally:
        sys.path.remove(str(root))
    counts = {int(n) for n in re.findall(r"--launch-count (\d+)", script)}
    assert counts == {len(NCU_CASES)}, (counts, len(NCU_CASES))


def test_a_providers_scope_holds_through_its_backward():
    """A tuned provider's settings must cover the backward, which autograd runs after the provider's function
    returned: a backward-only setting (the gradient from a saved lse) was once timed under the defaults."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from bench import Case, measure
        from providers import Ours
    finally:
        sys.path.remove(str(BENCH.parent))
    seen, inside = [], [False]

    class Recording(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", inside[0]))
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", inside[0]))
            return g

    class Scoped(Ours):
        name = "scoped"

        def scope(self):
            import contextlib

            @contextlib.contextmanager
            def flag():
                inside[0] = True
                try:
                    yield
                finally:
                    inside[0] = False

            return flag()

        def make(self, opts):
            return lambda x, t: softmax_ce_ext.cross_entropy(Recording.apply(x), t, **opts)

    case = Case((8, 5), torch.float32, "cpu", 0.0, 0)
    opts = dict(reduction="none", ignore_index=-100, label_smoothing=0.0)
    measure(Scoped(), case, "none+bwd", opts, 3, 1.0)
    assert {kind for kind, _ in seen} == {"fwd", "bwd"} and all(flag for _, flag in seen), seen


def test_lean_exponent_argument_is_as_exact_as_the_subtraction():
    """benchmarks/exp2base_error.py emulates the lean sweeps' exponent argument (one FFMA and a per-row factor,
    csrc/cuda/softmax_ce_chunks.cuh Exp2Base) in float32: its constants split log2(e) exactly, and its error
    against e^(x - b), for |x - b| < 40 (an argument under 64 in magnitude), is that of rounding the argument
    once, 2^-18 ln 2, and the factor's: the plain sweeps round it twice (3.5e-6 seen in float32)."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        import exp2base_error as e
    finally:
        sys.path.pop(0)
    assert e.L_HI.item() + e.L_LO.item() == e.L.item()
    g = torch.Generator().manual_seed(1)
    for centre in (0.0, 30.0, -2000.0, 4000.0):
        for dtype in (torch.bfloat16, torch.float32):
            x = (torch.randn(20000, generator=g, dtype=torch.float64) * 4 + centre).to(dtype).float()
            for b in (x.max(), torch.logsumexp(x.double(), 0).float()):
                exact = torch.exp(x.double() - b.double())
                keep = (x.double() - b.double()).abs() < 40
                lean = (e.lean(x, b) / exact - 1).abs()[keep].max().item()
                assert lean < 2.0**-18 * 0.6932 + 2.0**-23, (centre, dtype, lean)


def test_host_time_names_every_piece():
    """benchmarks/host_time.py (host time per call, ours piece by piece beside torch's): a quick CPU run prints a
    positive time for every piece of every shape; --profile lists our ops' host events; a malformed shape exits 2."""
    script = BENCH.parent / "host_time.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shapes", "8x100", "3x7", "--calls", "2",
                        "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    header, *lines = r.stdout.splitlines()
    assert header.startswith("host us per call (cpu, float32")
    tables, shape = {}, None
    for line in lines:
        if not line.startswith(" "):
            shape = tables.setdefault(line, {})
        else:
            name, us = line.strip().rsplit(maxsplit=1)
            shape[name] = float(us)
    assert set(tables) == {"8x100", "3x7"}
    for times in tables.values():
        assert {"torch F.cross_entropy, no_grad", "ours cross_entropy, no_grad", "ours fwd+bwd", "op mean_forward",
                "op mean_forward_backward"} <= set(times), times
        assert len(times) == 14 and all(us > 0 for us in times.values()), times
    prof = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shapes", "3x7", "--calls", "1",
                           "--rounds", "1", "--profile"], capture_output=True, text=True, timeout=300)
    assert prof.returncode == 0, prof.stdout + prof.stderr
    assert "profile: ours cross_entropy, no_grad, 3x7, 10 calls" in prof.stdout
    assert "softmax_ce_ext::mean_forward_backward" in prof.stdout  # the fwd+bwd table names our op
    bad = subprocess.run([sys.executable, str(script), "--shapes", "8"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "malformed shape '8'" in bad.stderr  # bench.py's parser


def test_verdicts_reads_a_gpu_log():
    """benchmarks/verdicts.py on a recorded H200 variants log (2026-11-27b): each tuned provider's points against
    `ours` in the same case (ours 81.0%, ours_lean 84.3% at 8192x32000 bf16 fwd+bwd)."""
    root = BENCH.parent
    log = root / "results_h200" / "2026-11-27b" / "call1_variants.log"
    sys.path.insert(0, str(root))
    try:
        from verdicts import rows, verdicts
    finally:
        sys.path.remove(str(root))
    table = rows(log.read_text().splitlines())
    assert table[("8192x32000", "bfloat16", "fwd+bwd")]["ours_lean"] == 84.3
    out, by_provider = verdicts(table, 1.0)
    lean = {case: delta for provider, case, _, _, delta in out if provider == "ours_lean"}
    assert lean[("8192x32000", "bfloat16", "fwd+bwd")] == pytest.approx(3.3)
    assert "ours" not in by_provider and len(by_provider["ours_lean"]) == 22
    r = subprocess.run([sys.executable, str(root / "verdicts.py"), str(log)], capture_output=True, text=True)
    assert r.returncode == 0 and "ours_pipeline8 mean  -3.0" in r.stdout, r.stdout + r.stderr
    empty = subprocess.run([sys.executable, str(root / "verdicts.py"), str(BENCH)], capture_output=True, text=True)
    assert empty.returncode != 0 and "no case" in empty.stderr


def test_slice_trace_summarizes_stamps():
    """benchmarks/slice_trace.py's summary of the slice kernel's phase stamps, on a synthetic record of 2 CTAs on
    one SM at 2 GHz (clusters of 2), 3 rows each, the first of which is left out: every phase its medians in ns; a
    CTA that stamped nothing (past the grid) is not counted."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from slice_trace import HEADER, PHASES, STAMPS, summarize
    finally:
        sys.path.remove(str(BENCH.parent))
    rows, ctas = 4, 3
    buf = torch.zeros(ctas, HEADER + STAMPS * rows, dtype=torch.int64)
    steps = [100, 200, 50, 400, 1000, 30]  # clocks from each stamp 0-5 to the next: thread 0's phases
    lag, last_wait = 30, 160  # the last warp's sweeps end 30 clocks after thread 0's; its chunks land at 160
    expect = {"wait": 100, "wait*": last_wait, "sweeps": 200, "lag": lag, "reduce": 50 - lag, "cluster": 400,
              "grad": 1000, "tail": 30}
    assert set(expect) == set(PHASES)
    for c in range(2):
        clock = 10_000 * (c + 1)
        buf[c, :7] = torch.tensor([7, c, 2, 5_000, clock, 5_000 + 1_000_000, clock + 2_000_000])
        for i in range(3):
            base = HEADER + STAMPS * i
            start = clock + i * (sum(steps) + 20)  # gaps of 20 clocks between rows
            stamps = [start]
            for s in steps:
                stamps.append(stamps[-1] + s)
            buf[c, base:base + 7] = torch.tensor(stamps)
            buf[c, base + 8] = start + last_wait
            buf[c, base + 9] = stamps[2] + lag
        buf[c, 7] = 3
    s = summarize(buf.flatten(), ctas, rows)
    assert s["ghz"] == pytest.approx(2.0) and s["ctas"] == 2 and s["rows"] == 3
    assert s["clusters"] == [2] and s["per_sm"] == 2
    for name, clocks in expect.items():
        assert s[name] == pytest.approx(clocks / 2.0), name
    assert s["gap"] == pytest.approx(10.0) and s["period"] == pytest.approx((sum(steps) + 20) / 2.0)
    assert s["spread"] == 0.0  # both CTAs end at 1_005_000 ns
    # The first row of a CTA (not prefetched) and rows past its count are left out: one CTA, 3 rows in its buffer,
    # 2 stamped, the first waiting 5000 clocks: the median wait is the second row's.
    one = torch.zeros(1, HEADER + STAMPS * 3, dtype=torch.int64)
    one[0, :8] = torch.tensor([3, 0, 1, 0, 0, 1000, 2000, 2])
    one[0, HEADER:HEADER + 7] = torch.tensor([0, 5000, 5001, 5002, 5003, 5004, 5005])
    one[0, HEADER + STAMPS:HEADER + STAMPS + 7] = torch.tensor([6000, 6040, 6041, 6042, 6043, 6044, 6045])
    one[0, HEADER + 2 * STAMPS:HEADER + 2 * STAMPS + 7] = 99_999  # not stamped
    s1 = summarize(one.flatten(), 1, 3)
    assert s1["wait"] == pytest.approx(20.0) and s1["rows"] == 2 and s1["per_sm"] == 1
    assert s1["gap"] != s1["gap"]  # NaN: no two consecutive counted rows
    # The script's glue (bench.py's Case, run_once, timed, copy_bandwidth; the tuning, the buffer) on the CPU, where
    # no slice kernel stamps: every case says so; a case that fails (integer logits) is reported, the next still runs.
    from slice_trace import run
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        failed = run([((4, 300), torch.float32, {}), ((2, 5), torch.int32, {}),
                      ((2, 700), torch.float32, dict(slice_kb=32))], 3, device="cpu")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("slice trace: cpu") and len(lines) == 5 and failed == 1, lines
    assert "nothing stamped" in lines[2] and "FAILED" in lines[3] and "nothing stamped" in lines[4], lines
    two = buf.clone()
    two[1, 3], two[1, 5] = 5_000 + 250_000, 5_000 + 500_000  # CTA 1 starts late and ends half-way
    assert summarize(two.flatten(), ctas, rows)["spread"] == pytest.approx(0.5)


def test_settings_line_names_what_is_not_built_in(monkeypatch):
    """A CUDA record says which settings `ours` ran under where the environment changed them (a lever timed as the
    default before it becomes one)."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import bench as bench_module

    from softmax_ce_ext import tuning

    assert bench_module.settings_line(dict(tuning.BUILT_IN)) == "CUDA settings: built in"
    line = bench_module.settings_line({**tuning.BUILT_IN, "pdl": True, "dynamic_rows": True})
    assert line == "CUDA settings: dynamic_rows=True, pdl=True (the rest built in)"
