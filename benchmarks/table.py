"""The comparison table of benchmarks/compare.sh's JSON lines: seconds per step (median) of
distbp and its peers per workload, with distbp's ratio to PyTorch DDP 2x1."""

import json
import sys


def fmt(sec):
    return "-" if sec is None else (f"{sec * 1e3:.3g} ms" if sec < 1 else f"{sec:.3g} s")


def main(path):
    rows = {}
    for line in open(path):
        if not line.strip():
            continue
        record = json.loads(line)
        if "results" in record:  # a distbp bench report
            for r in record["results"]:
                key = "distbp 1 process" if r["workers"] == 0 else f"distbp {r['workers']}x1"
                rows.setdefault(r["workload"], {})[key] = r["sec_per_step"]
                if r["workers"]:
                    rows[r["workload"]][f"ceiling {r['workers']} thread(s)"] = r["ceiling_sec"]
        else:
            name = f"torch {record['layout']}" if record["system"] == "torch" else f"{record['system']} {record['layout']}"
            rows.setdefault(record["workload"], {})[name] = record["sec_per_step"]
    columns = ["distbp 1 process", "ceiling 1 thread(s)", "torch 1 thread(s)", "distbp 2x1", "ceiling 2 thread(s)",
               "torch 2 thread(s)", "ddp 2x1", "ray-train 2x1"]
    print("| workload | " + " | ".join(columns) + " | distbp 2x1 / DDP 2x1 |")
    print("|---" * (len(columns) + 2) + "|")
    for workload, got in rows.items():
        ratio = got.get("distbp 2x1", 0) / got["ddp 2x1"] if got.get("ddp 2x1") else None
        cells = [fmt(got.get(c)) for c in columns] + ["-" if ratio is None else f"{ratio:.2f}x"]
        print(f"| {workload} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-results.jsonl")
