"""What a worker's bits depend on besides the job: its BLAS library, version, kernel and
threads (read with threadpoolctl), and the pin of `cluster.blas_kernel`.

OpenBLAS picks its kernel when it loads, from the CPU or from OPENBLAS_CORETYPE. Two kernels
sum a matrix product in different orders, so the same job gives other bits on a node that picks
another one (a different CPU, or an environment that sets the variable). Pinning sets the
variable in every worker's environment before it starts, through Ray's runtime_env."""

import os

from threadpoolctl import threadpool_info

KERNEL_ENV = "OPENBLAS_CORETYPE"
AUTO = "auto"

# The x86-64 instruction sets an OpenBLAS kernel needs (Linux /proc/cpuinfo flag names). A kernel
# the CPU cannot run dies of SIGILL in its first product, so a pin is checked against these first.
NEEDS_FLAGS = {
    "sandybridge": ("avx",),
    "haswell": ("avx2", "fma"),
    "zen": ("avx2", "fma"),
    "skylakex": ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "cooperlake": ("avx512f", "avx512bw", "avx512_bf16"),
    "sapphirerapids": ("avx512f", "avx512bw", "avx512_bf16", "amx_tile"),
}


def describe():
    """{'library', 'version', 'kernel', 'threads'} of the BLAS numpy uses in this process
    (library None when threadpoolctl finds none)."""
    import numpy

    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not blas:
        return {"library": None, "version": None, "kernel": None, "threads": None}
    # scipy (scikit-learn) loads an OpenBLAS of its own beside numpy's: report numpy's, the one
    # that runs the matrix products, found by where it lies (else the first one loaded).
    here = os.path.dirname(numpy.__file__)
    ours = (here + os.sep, os.path.join(os.path.dirname(here), "numpy.libs") + os.sep)
    info = next((i for i in blas if str(i.get("filepath", "")).startswith(ours)), blas[0])
    return {"library": info.get("internal_api"), "version": info.get("version"),
            "kernel": info.get("architecture"), "threads": info.get("num_threads")}


def cpu_flags():
    """The CPU's instruction-set flags (Linux), or None when they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def pin_problem(kernel, where):
    """Why this process cannot run pinned `kernel` (one line), or None when it runs it.
    `where` names the node in the message."""
    flags = cpu_flags()
    missing = [f for f in NEEDS_FLAGS.get(kernel.lower(), ()) if flags is not None and f not in flags]
    if missing:
        return f"{where}'s CPU cannot run the {kernel} kernel (it lacks {', '.join(missing)})"
    info = describe()
    if info["library"] != "openblas":
        return f"{where}'s numpy uses {info['library'] or 'no BLAS threadpoolctl knows'}, not OpenBLAS, whose kernel it pins"
    if (info["kernel"] or "").lower() != kernel.lower():
        return f"the OpenBLAS on {where} runs {info['kernel']} with {KERNEL_ENV}={os.environ.get(KERNEL_ENV)!r}: {kernel!r} is not one of its kernels"
    return None


def runtime_env(kernel):
    """The Ray runtime_env that starts a worker with `kernel` pinned; None for auto."""
    return None if kernel == AUTO else {"env_vars": {KERNEL_ENV: kernel}}


def differences(reports, previous=None):
    """One line saying how the workers' BLAS differ (between each other, or from `previous`,
    the reports of the run being resumed), or None when they all agree. A report is
    {'rank', 'node', 'library', 'version', 'kernel', 'threads'}."""

    def key(r):
        return tuple(r.get(k) for k in ("library", "version", "kernel", "threads"))

    def name(k):
        library, version, kernel, threads = k
        return f"{library} {version} {kernel} with {threads} thread{'' if threads == 1 else 's'}"

    def grouped(rs):
        groups = {}
        for r in rs:
            groups.setdefault(key(r), []).append(r)
        return groups

    def shown(groups):
        return "; ".join(
            f"{name(k)} on {', '.join(sorted({str(r.get('node')) for r in rs}))} (rank{'s' if len(rs) > 1 else ''} {', '.join(str(r.get('rank')) for r in rs)})"
            for k, rs in groups.items()
        )

    now = grouped(reports)
    if len(now) > 1:
        return f"the workers run different BLAS builds or kernels ({shown(now)}): the bits may differ from run to run; pin one with cluster.blas_kernel"
    if previous:
        before = grouped(previous)
        if set(before) != set(now):
            return (f"the run being resumed ran {shown(before)}, this one runs {shown(now)}: the bits will differ "
                    "from an uninterrupted run; pin one with cluster.blas_kernel")
    return None
