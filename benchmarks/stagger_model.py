"""A toy model of the slice kernel's CTAs on one SM (NOTES.md, v0.12-dev, `stagger`): k CTAs each alternate a
memory phase M (M units of work at the SM's share of the bandwidth, shared equally by the CTAs in M) and a phase S
with nothing in flight (S units: the max/sum sweeps on the special-function unit, the reductions, the exchange;
shared equally by the CTAs in S).  Prints the fraction of time the memory idles (no CTA in M), per window, for
CTAs started at the given offsets (units of M work already done at time 0).

    python benchmarks/stagger_model.py                       # in step, nearly in step, a third apart
    python benchmarks/stagger_model.py --m 4 --s 1.5 --offsets 0 2 4
"""

import argparse


def idle_fractions(offsets, m, s, horizon, window, dt=0.002):
    ctas = [["M", m - o] for o in offsets]  # [phase, work left in it]
    out, idle, t, last = [], 0.0, 0.0, 0.0
    while t < horizon:
        in_m = sum(1 for phase, _ in ctas if phase == "M")
        in_s = len(ctas) - in_m
        idle += dt if in_m == 0 else 0.0
        for c in ctas:
            c[1] -= dt / (in_m if c[0] == "M" else in_s)
            if c[1] <= 0:
                c[0], c[1] = ("S", c[1] + s) if c[0] == "M" else ("M", c[1] + m)
        t += dt
        if t - last >= window:
            out.append(idle / window)
            idle, last = 0.0, t
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=float, default=4.0, help="memory work per row and CTA")
    p.add_argument("--s", type=float, default=1.0, help="work with nothing in flight per row and CTA")
    p.add_argument("--offsets", type=float, nargs="*", help="start offsets, one per CTA (default: three cases)")
    p.add_argument("--horizon", type=float, default=600.0)
    p.add_argument("--window", type=float, default=100.0)
    a = p.parse_args()
    cases = [a.offsets] if a.offsets else [[0, 0, 0], [0, 0.1, 0.2], [0, (a.m + a.s) / 3, 2 * (a.m + a.s) / 3]]
    for offsets in cases:
        f = idle_fractions(offsets, a.m, a.s, a.horizon, a.window)
        print(f"offsets {offsets}: memory idle per window {' '.join(f'{x:.2f}' for x in f)}")


if __name__ == "__main__":
    main()
