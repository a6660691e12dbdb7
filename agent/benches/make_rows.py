#!/usr/bin/env python3
"""Build a big scoring CSV by resampling the rows of a corpus input.csv.

    python3 agent/benches/make_rows.py --from shared/tests/corpus/dev/rf_clf_100x10_bench/input.csv \\
        --rows 200000 --out /tmp/rows.csv

Rows are drawn with replacement (fixed seed). Float columns get a small
multiplicative jitter (default: 1% standard deviation) and are written as
float32 repr. Empty cells (missing values) stay empty. Integer and string
columns are copied unchanged. The header is kept, so the output follows the
same CSV rules as the corpus.
"""

import argparse
import csv
import sys

import numpy as np


def col_kind(cells):
    vals = [c for c in cells if c != ""]
    try:
        for c in vals:
            int(c)
        return "int" if vals else "float"
    except ValueError:
        pass
    try:
        for c in vals:
            float(c)
        return "float"
    except ValueError:
        return "str"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True, help="corpus input.csv")
    ap.add_argument("--rows", type=int, default=200000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jitter", type=float, default=0.01, help="relative std of the float jitter")
    args = ap.parse_args()

    with open(args.src, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    cols = list(zip(*body))
    kinds = [col_kind(c) for c in cols]
    rng = np.random.RandomState(args.seed)
    idx = rng.randint(0, len(body), args.rows)

    out_cols = []
    for c, k in zip(cols, kinds):
        if k == "float":
            v = np.array([float(x) if x != "" else np.nan for x in c], dtype=np.float64)[idx]
            v = v * (1.0 + rng.normal(0.0, args.jitter, args.rows))
            v32 = v.astype(np.float32)
            out_cols.append(["" if x != x else repr(x) for x in v32.astype(np.float64).tolist()])
        else:
            src = np.array(c, dtype=object)
            out_cols.append(src[idx].tolist())

    with open(args.out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(zip(*out_cols))
    print("wrote %d rows x %d columns (%s) to %s" % (args.rows, len(header), ",".join(sorted(set(kinds))), args.out),
          file=sys.stderr)


if __name__ == "__main__":
    main()
