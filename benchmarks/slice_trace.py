"""Where a slice-kernel row's time goes: thread 0 of each CTA stamps its SM clock at each phase of its first rows
(the default kernel's traced twin, softmax_ce_tuning.h SliceTrace), and this prints the median phase times.

Phases of one row, per CTA (clocks of thread 0, so "own" is warp 0's share; '*': the CTA's last warp):
  wait     own chunks landed (copies issued during the previous row's gradient sweep)
  wait*    the last warp's chunks landed
  sweeps   own max and sum sweeps over shared memory
  lag      from thread 0's sweeps done to the last warp's (what the block statistics' barrier waits for)
  reduce   block statistics once the last warp is there (two shuffle trees, barriers)
  cluster  the exchange with the cluster's other CTAs (waiting for the slowest of them)
  grad     own gradient sweep (stores, next row's copies)
  tail     the next row's remaining copies
  gap      from row end to the next row's start (loop top, target, checks)
ideal = the row's bytes (its slice read once, its gradient written once) times the CTAs sharing the SM, over the
SM's share of the copy bandwidth: the period at which the SM's CTAs would together move bytes at the floor.
Why: the fused training pass sits at 77-85% of its floor at the LLM shapes (H200, 2026-11-28) where the gradient
from a saved lse reaches 97%, and 32 KiB slices (clusters of 8) lose 12-20 points more for reasons not yet seen."""

import argparse
import statistics
import sys
from pathlib import Path

import torch

HEADER, STAMPS = 8, 10  # csrc/cuda/softmax_ce_rows.cuh kTraceHeader, kTraceStamps
# Each phase as (from stamp, to stamp): 0 start, 1 own landed, 2 own sweeps done, 3 block statistics, 4 exchange,
# 5 own gradient done, 6 row end, 8 the last warp's chunks landed, 9 the last warp's sweeps done (7: ns).
PHASES = {"wait": (0, 1), "wait*": (0, 8), "sweeps": (1, 2), "lag": (2, 9), "reduce": (9, 3), "cluster": (3, 4),
          "grad": (4, 5), "tail": (5, 6)}


def summarize(buf, ctas, rows):
    """The stamps (a CPU int64 tensor of ctas * (HEADER + STAMPS * rows)) as a dict: per phase the median ns over
    every stamped row but each CTA's first (its copies were not prefetched), 'gap' and 'period' likewise from
    consecutive rows, 'clusters' sizes seen, 'per_sm' the most CTAs stamped on one SM, 'ghz' the clock rate, and
    'ctas' / 'rows' the CTAs that stamped and the rows each stamped at most, 'spread' the CTAs' end times from the
    first to the last as a fraction of the kernel's span (first start to last end: a CTA that ends early idles its
    share of the SM while the rest finish; static rows per CTA cannot even that out)."""
    rec = buf.view(ctas, HEADER + STAMPS * rows).tolist()
    phases = {k: [] for k in (*PHASES, "gap", "period")}
    per_sm, sizes, ghz, used, most, starts, ends = {}, set(), [], 0, 0, [], []
    for h in rec:
        n_rows = int(h[7])
        if n_rows == 0:
            continue
        used += 1
        most = max(most, n_rows)
        per_sm[h[0]] = per_sm.get(h[0], 0) + 1
        sizes.add(int(h[2]))
        if h[6] > h[4] and h[5] > h[3]:
            ghz.append((h[6] - h[4]) / (h[5] - h[3]))
            starts.append(h[3])
            ends.append(h[5])
        row = [h[HEADER + STAMPS * i: HEADER + STAMPS * (i + 1)] for i in range(n_rows)]
        for i in range(1, n_rows):
            s = row[i]
            for name, (a, b) in PHASES.items():
                phases[name].append(s[b] - s[a])
            if i + 1 < n_rows:
                phases["gap"].append(row[i + 1][0] - s[6])
                phases["period"].append(row[i + 1][0] - s[0])
    rate = statistics.median(ghz) if ghz else 1.0
    out = {k: statistics.median(v) / rate if v else float("nan") for k, v in phases.items()}
    span = max(ends) - min(starts) if ends else 0
    out.update(clusters=sorted(sizes), per_sm=max(per_sm.values(), default=0), ghz=rate, ctas=used, rows=most,
               spread=(max(ends) - min(ends)) / span if span else float("nan"))
    return out


def line(label, s, ideal_ns):
    parts = " ".join(f"{s[k]:7.0f}" for k in (*PHASES, "gap", "period"))
    return (f"{label:>40} n={','.join(map(str, s['clusters'])):>2} {s['per_sm']}/SM {parts} {ideal_ns:7.0f} "
            f"{100 * ideal_ns / s['period']:5.1f}%")


def run(cases, rows, device="cuda"):
    """Each case traced and summarized; the number of cases that failed.  On the CPU (a test of this script's glue)
    nothing stamps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import copy_bandwidth

    cuda = device == "cuda"
    bw = copy_bandwidth(device)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 1
    ctas = 1024
    buf = torch.zeros(ctas * (HEADER + STAMPS * rows), dtype=torch.int64, device=device)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"slice trace: {name}, copy {bw:.0f} GB/s, {sms} SMs; median ns per row and CTA")
    print(f"{'case':>40} {'':>4} {'':>4} " + " ".join(f"{k:>7}" for k in (*PHASES, "gap", "period", "ideal")) +
          " ideal/period")
    failed = 0
    for shape, dtype, tune in cases:
        label = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {','.join(f'{k}={v}' for k, v in tune.items())}"
        try:
            print(trace_case(shape, dtype, tune, label, Trace(buf, ctas, rows, bw, sms)), flush=True)
        except Exception as e:  # one case's failure (memory, a launch) leaves the others their device time
            failed += 1
            print(f"{label:>40} FAILED: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    return failed


class Trace:
    """The stamp buffer and what the summary lines need: its CTAs and rows, the copy bandwidth (GB/s), the SMs."""

    def __init__(self, buf, ctas, rows, bw, sms):
        self.buf, self.ctas, self.rows, self.bw, self.sms = buf, ctas, rows, bw, sms


def trace_case(shape, dtype, tune, label, tr):
    """One case: timed plain and traced (the stamps from the last traced call), its summary line."""
    import softmax_ce_ext
    from softmax_ce_ext import _C, tuning

    from bench import Case, run_once, timed

    device = tr.buf.device.type
    case = Case(shape, dtype, device, 0.0, 0)
    with tuning.using(**{**tuning.BUILT_IN, **tune}):
        call = lambda: run_once(softmax_ce_ext.cross_entropy, case.inputs[0], case, "fwd+bwd")  # noqa: E731
        _, ref = call()
        plain = statistics.median(timed(call, device, 1.0) for _ in range(5))
        tr.buf.zero_()
        if device == "cuda":  # a CPU buffer's address must never reach a kernel
            _C.set_slice_trace(tr.buf.data_ptr(), tr.ctas, tr.rows, tr.buf.device.index)
        try:
            _, g = call()
            traced = statistics.median(timed(call, device, 1.0) for _ in range(5))
        finally:
            _C.set_slice_trace(0, 0, 0, -1)
        same = torch.equal(g, ref)
    s = summarize(tr.buf.cpu(), tr.ctas, tr.rows)
    if s["ctas"] == 0:
        return f"{label:>40} nothing stamped: no slice kernel ran, or not the default one (lean, st.async)"
    n = s["clusters"][0]
    row_bytes = 2 * case.nbytes / shape[0] / n  # this CTA's slice read once and its gradient written once
    ideal_ns = row_bytes * s["per_sm"] / (tr.bw * 1e9 / tr.sms) * 1e9
    return (line(label, s, ideal_ns) + f"  {s['ctas']} CTAs, ends spread {100 * s['spread']:.1f}%, "
            f"{s['ghz']:.2f} GHz, {plain:.3f} ms (traced {traced:.3f}), same gradient: {same}")


CASES = [((8192, 32000), torch.bfloat16, {}), ((8192, 32000), torch.bfloat16, dict(slice_kb=32)),
         ((8192, 128256), torch.bfloat16, {}), ((8192, 128256), torch.bfloat16, dict(slice_kb=32)),
         ((8192, 128256), torch.bfloat16, dict(prefetch=False)), ((8192, 128256), torch.bfloat16, dict(ring_kb=0)),
         ((8192, 32000), torch.float32, {}), ((8192, 128256), torch.float32, {}), ((4096, 256000), torch.bfloat16, {}),
         ((8192, 32000), torch.bfloat16, dict(dynamic_rows=True)), ((8192, 128256), torch.bfloat16, dict(dynamic_rows=True)),
         ((8192, 128256), torch.float32, dict(dynamic_rows=True)), ((4096, 256000), torch.bfloat16, dict(dynamic_rows=True))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=48, help="rows stamped per CTA")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("slice_trace: no GPU is visible")
    sys.exit(1 if run(CASES, args.rows) else 0)


if __name__ == "__main__":
    main()
