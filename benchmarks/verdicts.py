"""Each tuned provider against `ours` (the defaults), row by row, from bench.py's printed tables (a gpu_check log:
variants.log, confirm.log): the points of the floor each setting gains or loses at each shape, dtype and mode,
and a line per provider with its mean and range.  What the GPU session reads to decide which settings become
defaults (NOTES.md: a setting wins where it gains at the shapes it is for and loses nowhere else).

    python benchmarks/verdicts.py gpu_check_out/variants.log [--margin 1.0]
"""

import argparse
import re
import statistics
import sys
from collections import defaultdict

ROW = re.compile(r"^\s*(\S+)\s+(float32|bfloat16|float16|float64)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%")


def rows(lines):
    """{(shape, dtype, mode): {provider: % of floor}}, the later table winning where a case repeats."""
    table = defaultdict(dict)
    for line in lines:
        m = ROW.match(line)
        if m:
            shape, dtype, mode, provider = m.group(1, 2, 3, 4)
            table[(shape, dtype, mode)][provider] = float(m.group(7))
    return table


def verdicts(table, margin):
    """[(provider, case, ours %, its %, delta)] and {provider: deltas}."""
    out, by_provider = [], defaultdict(list)
    for case, cells in table.items():
        if "ours" not in cells:
            continue
        for provider, pct in cells.items():
            if provider.startswith("ours_"):
                delta = pct - cells["ours"]
                out.append((provider, case, cells["ours"], pct, delta))
                by_provider[provider].append(delta)
    return out, by_provider


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="bench.py output (gpu_check's variants.log, confirm.log)")
    p.add_argument("--margin", type=float, default=1.0, help="points of the floor counted as noise (default 1.0)")
    args = p.parse_args(argv)
    lines = []
    for path in args.logs:
        with open(path) as f:
            lines += f.read().splitlines()
    out, by_provider = verdicts(rows(lines), args.margin)
    if not out:
        sys.exit("verdicts: no case with both `ours` and a tuned provider (ours_*) in the logs")
    print(f"{'provider':>20} {'shape':>16} {'dtype':>8} {'mode':>9} {'ours':>6} {'it':>6} {'delta':>6}")
    for provider, (shape, dtype, mode), ours, pct, delta in sorted(out):
        mark = "+" if delta > args.margin else "-" if delta < -args.margin else "="
        print(f"{provider:>20} {shape:>16} {dtype:>8} {mode:>9} {ours:6.1f} {pct:6.1f} {delta:+6.1f} {mark}")
    print(f"\nper provider (points of the floor against ours; +/- beyond {args.margin}):")
    for provider, deltas in sorted(by_provider.items()):
        wins = sum(d > args.margin for d in deltas)
        losses = sum(d < -args.margin for d in deltas)
        print(f"{provider:>20} mean {statistics.mean(deltas):+5.1f}  min {min(deltas):+5.1f}  max {max(deltas):+5.1f}  "
              f"gains {wins}, losses {losses} of {len(deltas)}")


if __name__ == "__main__":
    main()
