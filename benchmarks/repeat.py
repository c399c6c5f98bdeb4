"""Repeated Python calls in one process, with the kept Ray's idle actors reused and without,
side by side: `distbp.train`-style runs of jobs/tiny.yaml (200 steps) and MLPClassifier fits of
load_breast_cancer (standardised, steps=50). Each mode runs in its own process, one after the
other, so both pay their own first call.

    python benchmarks/repeat.py [--calls 5]

Prints each call's seconds, call to return, and for the runs the phases. Needs the sklearn extra.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(kind, reuse, calls):
    from distbp.runtime import cluster

    if not reuse:
        cluster.holds_embedded = lambda: False  # as before: every call starts its own actors
    out = []
    if kind == "train":
        from distbp.api import load
        from distbp.trainer import Trainer

        folder = tempfile.mkdtemp(prefix="repeat-")
        data = os.path.join(ROOT, "jobs", "data", "tiny.parquet")
        for _ in range(calls):
            t = time.perf_counter()
            trainer = Trainer(load(os.path.join(ROOT, "jobs", "tiny.yaml"), ["train.steps=200", f"output.dir={folder}/run", f"data.path={data}"]), force=True, keep_ray=True)
            trainer.run()
            out.append({"seconds": time.perf_counter() - t, "phases": {k: round(v, 2) for k, v in trainer.phases.items()}})
    else:
        from sklearn.datasets import load_breast_cancer

        from distbp.sklearn import MLPClassifier

        X, y = load_breast_cancer(return_X_y=True)
        X = (X - X.mean(0)) / X.std(0)
        for _ in range(calls):
            t = time.perf_counter()
            MLPClassifier(steps=50).fit(X, y)
            out.append({"seconds": time.perf_counter() - t})
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1] == "reuse", args.calls)
    if not os.path.exists(os.path.join(ROOT, "jobs", "data", "tiny.parquet")):
        subprocess.run([sys.executable, "-m", "distbp", "data", "make", "xor", "--rows", "256", "-o", os.path.join(ROOT, "jobs", "data", "tiny.parquet")], check=True)
    for kind in ("train", "fit"):
        later = {}
        for mode in ("new-actors", "reuse"):
            proc = subprocess.run([sys.executable, __file__, "--calls", str(args.calls), "--child", kind, mode], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-2000:])
            calls = json.loads(proc.stdout.strip().splitlines()[-1])
            later[mode] = [c["seconds"] for c in calls[1:]]
            for i, c in enumerate(calls, 1):
                print(f"{kind:5s} {mode:10s} call {i}: {c['seconds']:5.2f} s  {c.get('phases', '')}", flush=True)
        a, b = statistics.median(later["new-actors"]), statistics.median(later["reuse"])
        print(f"{kind}: calls 2..{args.calls}, median {a:.2f} s with new actors, {b:.2f} s reusing them ({a / b:.1f}x)")


if __name__ == "__main__":
    main()
