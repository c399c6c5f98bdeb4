"""`distbp bench`'s report: the table, its conclusion and legend, the warnings for figures a busy
machine made untrustworthy, the JSON, and the chart."""

import json

from distbp.errors import UsageError

def ms(seconds):
    """Milliseconds in plain digits, about 3 significant ones, never in scientific notation."""
    if seconds is None:
        return "-"
    v = seconds * 1e3
    return f"{v:.{0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2 if abs(v) >= 1 else 3}f}"


LEGEND = """\
ms/step: median time per step (min ms: the fastest); ceiling ms: the matrix products a step needs, timed
with as many BLAS threads as workers; x ceiling: ms/step / ceiling ms; compute ms: the slowest worker's
forward and backward; fixed ms: ms/step - compute ms (links, the sum, the optimizer); PSS MB: the run's
processes together; worker MB: the largest worker's resident memory. Every key: docs/bench.md."""


def flags(report):
    """`warning:` lines for figures the machine made untrustworthy: a ceiling that gets slower
    with more threads, a run faster than its ceiling, more speed-up than cores or workers, and
    more workers than cores. A busy machine gives these; rerun on an idle one."""
    out, cores = [], report["machine"]["cores"] or 1
    for name in dict.fromkeys(r["workload"] for r in report["results"]):
        rows = [r for r in report["results"] if r["workload"] == name]
        ceilings = {max(1, r["workers"]): r["ceiling_sec"] for r in rows}
        single = next((r for r in rows if r["workers"] == 0), None)
        for k in sorted(ceilings)[1:]:
            if ceilings[k] > 1.1 * ceilings[k - 1]:
                out.append(f"warning: {name}: the {k}-thread ceiling ({ms(ceilings[k])} ms) is slower than the {k - 1}-thread one "
                           f"({ms(ceilings[k - 1])} ms): other work shares the cores, so the x ceiling figures are not to be trusted")
        for r in rows:
            run = "1 process" if r["workers"] == 0 else f"{r['workers']} workers"
            if r["ceiling_ratio"] < 0.9:
                out.append(f"warning: {name}: {run} ran at {r['ceiling_ratio']:.2f}x its ceiling, faster than the products it needs: "
                           "the ceiling was timed while the machine was busy")
            if r["workers"] and single is not None:
                speedup = single["sec_per_step"] / r["sec_per_step"]
                if speedup > min(r["workers"], cores):
                    out.append(f"warning: {name}: {run} are {speedup:.2f}x as fast as 1 process on {cores} cores: more than "
                               "the cores allow (smaller shards fitting a cache can do it, a 1-process time slowed by other work more often)")
            if r["workers"] > cores:
                out.append(f"warning: {name}: {run} on {cores} cores: workers share cores, so their times say little about scaling")
    return out


def table(report):
    """The report as aligned text, one line per result, then one conclusion per workload and a
    legend of the columns."""
    head = ["workload", "run", "engine", "steps", "ms/step", "min ms", "ceiling ms", "x ceiling", "GFLOP/s",
            "compute ms", "fixed ms", "start-up s", "PSS MB", "worker MB"]
    lines = [head]
    num = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for r in report["results"]:
        run = "1 process" if r["workers"] == 0 else f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        lines.append([
            r["workload"], run, r.get("engine", "-"), str(r["steps"]), ms(r["sec_per_step"]), ms(r["sec_per_step_min"]),
            ms(r["ceiling_sec"]), num(r["ceiling_ratio"], "{:.2f}"), num(r["gflops_nominal"], "{:.1f}"), ms(r["compute_sec"]),
            ms(r["comm_overhead_sec"]) if r["workers"] else "-", num(r["startup_sec"], "{:.1f}") if r["workers"] else "-",
            num(r["pss_mb_total"], "{:.0f}"), num(r["rss_mb_worker_max"], "{:.0f}"),
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    conclusions = [conclusion(report, name) for name in dict.fromkeys(r["workload"] for r in report["results"])]
    return "\n".join(text + conclusions + [LEGEND])


def conclusion(report, workload):
    """One line: the most workers against one process and against their ceiling."""
    rows = [r for r in report["results"] if r["workload"] == workload]
    single = next(r for r in rows if r["workers"] == 0)
    top = max(rows, key=lambda r: r["workers"])
    return (
        f"{workload}: {top['workers']} workers {single['sec_per_step'] / top['sec_per_step']:.2f}x as fast as 1 process, "
        f"{top['ceiling_ratio']:.2f}x the {top['workers']}-thread ceiling, fixed cost {top['comm_overhead_sec'] * 1e3:.2f} ms/step"
    )


def merge(reports):
    """One report of several workloads: results in one list, each workload's spec and
    scaling model under `workloads`, and `warnings` (see `flags`)."""
    merged = {"machine": reports[0]["machine"], "results": [r for rep in reports for r in rep["results"]], "workloads": {}}
    merged["warnings"] = flags(merged)
    for rep in reports:
        name = rep["results"][0]["workload"]
        merged["workloads"][name] = {k: v for k, v in rep.items() if k not in ("machine", "results")}
    return merged


def to_json(report):
    return json.dumps(report)


def chart(reports, path):
    """A PNG of time per step against workers, one panel per workload, with the ceiling."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("matplotlib is not installed", hint="distbp needs it for plots: pip install 'matplotlib>=3.7,<4'") from None
    fig = Figure(figsize=(4.2 * len(reports), 3.6), layout="constrained")
    for ax, report in zip(fig.subplots(1, len(reports), squeeze=False)[0], reports):
        dist = [r for r in report["results"] if r["mode"] == "distributed"]
        single = next(r for r in report["results"] if r["mode"] == "single process")
        k = [r["workers"] for r in dist]
        ax.plot(k, [r["sec_per_step"] * 1e3 for r in dist], "o-", label="distbp, K workers x 1 thread")
        ax.plot(k, [r["ceiling_sec"] * 1e3 for r in dist], "k--", label="matmul ceiling, K threads")
        ax.axhline(single["sec_per_step"] * 1e3, color="tab:green", lw=1, label="distbp, one process")
        ax.set_title(f"{dist[0]['workload']} ({'-'.join(map(str, report['spec']['layers']))}, N={report['spec']['rows']})")
        ax.set_xlabel("workers")
        ax.set_ylabel("ms per step")
        ax.set_xticks(k)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path
