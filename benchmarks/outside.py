"""Time outside training, measured from outside, in one sitting: `distbp run jobs/tiny.yaml`
(embedded Ray, 2 workers, 2,000 steps) against PyTorch DDP's whole run of the same network
(2 ranks, 2,000 steps, benchmarks/peers.py), each minus its own training time. Runs alternate,
so both see the same machine.

    python benchmarks/outside.py [--rounds 3] [--steps 2000] [--address A]

distbp's training time is the `done:` line's seconds (first step to last); DDP's is the sum of
its steps, warm-up included (peers.py's train_sec). Everything else, launch to exit, is
outside training: interpreter and imports, Ray's start (or joining --address), actors, data,
plot, shutdown; for DDP, process spawn, imports, gloo's rendezvous and teardown. Needs the
`peers` extra (torch). Prints one line per run, then the medians and their ratio.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd, env=None):
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, proc


def distbp_run(steps, out, address):
    cmd = [sys.executable, "-m", "distbp", "run", "jobs/tiny.yaml", "--force", "--verbose", "--out", out, "--set", f"train.steps={steps}"]
    if address:
        cmd += ["--address", address]
    wall, proc = timed(cmd)
    train = float(re.search(r"^done: \d+ steps(?: \(early stop\))? in (\d+\.\d+) s", proc.stdout, re.M).group(1))
    phases = next((line for line in proc.stderr.splitlines() if line.startswith("phases: ")), "")
    return wall, train, phases


def ddp_run(steps):
    wall, proc = timed([sys.executable, os.path.join(ROOT, "benchmarks", "peers.py"), "tiny", "ddp", "--workers", "2", "--steps", str(steps)])
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])["train_sec"], ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--address", help="join this Ray instead of the embedded one (distbp only)")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="outside-")
    outside = {"distbp": [], "ddp": []}
    for r in range(args.rounds):
        for name, run in (("distbp", lambda: distbp_run(args.steps, os.path.join(out, "tiny"), args.address)), ("ddp", lambda: ddp_run(args.steps))):
            wall, train, phases = run()
            outside[name].append(wall - train)
            print(f"round {r + 1} {name:6s} launch to exit {wall:5.2f} s, training {train:5.2f} s, outside {wall - train:5.2f} s  {phases}", flush=True)
    d, p = statistics.median(outside["distbp"]), statistics.median(outside["ddp"])
    print(f"outside training, median of {args.rounds}: distbp {d:.2f} s, DDP {p:.2f} s, distbp / DDP {d / p:.2f}")


if __name__ == "__main__":
    main()
