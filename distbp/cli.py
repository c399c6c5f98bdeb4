"""The `distbp` command: thin click commands over the library. Errors become one line on
stderr and an exit code (2 bad input, 1 failure, 130/143 after a signal); no tracebacks."""

import functools
import json
import os
import sys

import click

from distbp.bench import WORKLOADS
from distbp.data.datasets import KINDS
from distbp.errors import DistbpError, UsageError, WriteFailed
from distbp.runtime.engine import ENGINES
from distbp.text import count

# Set DISTBP_DEBUG=1 to see the traceback of an unexpected error.
DEBUG = os.environ.get("DISTBP_DEBUG") == "1"


def one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistbpError as err:
            click.echo(f"{err.label}: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("stopped: interrupted", err=True)
            sys.exit(130)
        except WriteFailed as err:  # a full disk, no permission: the file, and what the system said
            if DEBUG:
                raise
            click.echo(f"error: cannot write {err.filename}: {err.strerror} (a file already there is kept as it was)", err=True)
            sys.exit(1)
        except Exception as err:  # a bug: still one line, with a way to see more
            if DEBUG:
                raise
            first = (str(err).splitlines() or [""])[0]
            click.echo(f"error: internal error: {type(err).__name__}: {first} (rerun with DISTBP_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper


class _UsageLine(click.ClickException):
    """A click usage error (bad option, missing argument, bad value) as one line, exit 2."""

    exit_code = 2

    def __init__(self, err):
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        super().__init__(" ".join(f"{err.format_message()}{where}".split()))

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


_SHOWS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # `distbp` alone prints the help


def _one_line(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except click.UsageError as err:
            if isinstance(err, _SHOWS_HELP):
                raise
            raise _UsageLine(err) from None

    return wrapper


class _OneLineCommand(click.Command):
    make_context = _one_line(click.Command.make_context)


class _OneLineGroup(click.Group):
    """Click's own usage errors, here and in every subcommand, print one line like ours."""

    command_class = _OneLineCommand
    make_context = _one_line(click.Group.make_context)
    invoke = _one_line(click.Group.invoke)  # resolves and parses the subcommand


_OneLineGroup.group_class = _OneLineGroup


@click.group(cls=_OneLineGroup)
@click.version_option(package_name="distbp")
def main():
    """distbp: data-parallel backpropagation for fully connected networks on Ray."""


@main.command()
@click.argument("job_file", metavar="JOB", type=click.Path(dir_okay=False))
@click.option("--workers", metavar="N", help="Shard workers: overrides cluster.workers.")
@click.option("--address", help="Join an existing Ray cluster: auto, host:port or ray://host:port.")
@click.option("--out", "out_dir", help="Output folder (default runs/<name>).")
@click.option("--resume", is_flag=True, help="Continue the run in the output folder from its newest checkpoint.")
@click.option("--force", is_flag=True, help="Replace a run already in the output folder.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any job key, e.g. --set train.optimizer.lr=0.01.")
@click.option("--quiet", is_flag=True, help="No progress bar or status lines; warnings and errors still print.")
@click.option("--verbose", is_flag=True, help="Also print the set-up line (workers, engine) and the time of each start-up and finish phase.")
@click.option("--dry-run", is_flag=True, help="Check the job and read every row (columns, widths, classes, NaN), without Ray; then exit.")
@one_line_errors
def run(job_file, workers, address, out_dir, resume, force, sets, quiet, verbose, dry_run):
    """Train the network of JOB on Ray."""
    from distbp import api

    overrides = list(sets)
    overrides += [f"cluster.workers={workers}"] if workers is not None else []
    overrides += [f"cluster.address={json.dumps(address)}"] if address is not None else []  # a string, as typed
    overrides += [f"output.dir={json.dumps(out_dir)}"] if out_dir is not None else []
    job = api.load(job_file, overrides)
    if dry_run:
        checked = api.dry_run(job)
        if checked is None:
            click.echo(f"ok: {job.source}: the job is valid; data.make will write {job.data_path()}")
        else:
            prep, dropped = checked
            skipped = f"; data.on_nan: drop will skip {count(dropped, 'row')} holding NaN or inf values" if dropped else ""
            click.echo(f"ok: {job.source}: {count(prep.source.num_rows, 'row')}, {count(len(prep.features), 'feature')}, {count(prep.spec.num_params, 'parameter')}{skipped}")
        return
    # Every error of the run's actors is distbp's to handle (a lost worker is recovered and
    # reported in one line); Ray's own "Unhandled error" tracebacks of the steps that a failure
    # cut short would only add noise. This process is the command's own.
    os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
    result = _run_with_progress(job, resume, force, quiet, verbose)
    if result.already_finished:
        click.echo(f"{result.out_dir}: already finished at step {result.steps}")
        return
    click.echo(closing_line(result))
    if result.plot_path:
        click.echo(f"plot: {result.plot_path}")
    if verbose:
        click.echo("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.phases.items()), err=True)


def closing_line(result):
    """`done: ...`: the steps, the training time, and the weights model.npz holds, measured
    over every training (and validation) row."""
    final = result.final
    names = [k for k in ("loss", "accuracy", "rmse", "r2", "val_loss", "val_accuracy", "val_rmse", "val_r2") if k in final]
    measured = ", ".join(f"{k} {final[k]:.4f}" for k in names)
    early = " (early stop)" if result.stopped_early else ""
    if result.best_step is not None:
        weights = f"the best validation weights, evaluated at step {result.best_step}"
    else:
        weights = f"the weights after step {result.steps}"
    return f"done: {count(result.steps, 'step')}{early} in {final.get('seconds', 0.0):.1f} s; model.npz holds {weights}: {measured} -> {result.model_path}"


def _run_with_progress(job, resume, force, quiet, verbose=False):
    from distbp.run.progress import Progress
    from distbp.trainer import Trainer

    progress = Progress(quiet=quiet)

    def on_start(start):  # the step count is known once the data is read (epochs)
        progress.start(start.total_steps, start.done, start.steps_per_epoch, start.batches)  # resumed: from there

    detail = progress.log if verbose else None
    trainer = Trainer(job, resume=resume, force=force, log=progress.log, on_step=progress.step, detail=detail, signals=True, on_start=on_start)
    try:
        return trainer.run()
    finally:
        progress.close()


@main.command(short_help="Check the job's backprop against central differences.")
@click.argument("job_file", metavar="JOB", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any job key.")
@one_line_errors
def gradcheck(job_file, sets):
    """Compare the job's backprop gradient with central differences (float64)."""
    from distbp import api
    from distbp.backprop.gradcheck import TOLERANCE
    from distbp.backprop.gradcheck import gradcheck as check

    job = api.load(job_file, list(sets))
    report = check(api.spec_of(job))
    for layer, n, err in report:
        click.echo(f"layer {layer}: {count(n, 'parameter')} checked, relative error {err:.2e}")
    worst = max(err for _, _, err in report)
    if worst > TOLERANCE:
        click.echo(f"error: gradcheck failed: relative error {worst:.2e} > {TOLERANCE:g}", err=True)
        sys.exit(1)
    click.echo(f"ok: max relative error {worst:.2e} <= {TOLERANCE:g}")


@main.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out_path", help="PNG file (default RUN_DIR/plot.png).")
@one_line_errors
def plot(run_dir, out_path):
    """Draw the loss, accuracy and per-layer gradient curves of a run."""
    from distbp.run.plot import plot_run

    click.echo(f"plot: {plot_run(run_dir, out_path)}")


@main.command("eval")
@click.argument("model_path", metavar="MODEL")
@click.argument("data_path", metavar="DATA")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@one_line_errors
def eval_(model_path, data_path, as_json):
    """Loss (and accuracy) of MODEL on the rows of DATA."""
    from distbp import api

    result = api.evaluate(model_path, data_path)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo("  ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


@main.command()
@click.argument("model_path", metavar="MODEL")
@click.argument("data_path", metavar="DATA")
@click.option("-o", "--out", "out_path", required=True, help="Output file, .parquet or .csv.")
@one_line_errors
def predict(model_path, data_path, out_path):
    """Write MODEL's predictions for the rows of DATA."""
    from distbp import api

    rows = api.predict_file(model_path, data_path, out_path)
    click.echo(f"wrote {count(rows, 'prediction')} -> {out_path}")


@main.command(short_help="Write MODEL as an ONNX graph.")
@click.argument("model_path", metavar="MODEL")
@click.option("-o", "--out", "out_path", required=True, help="The .onnx file to write.")
@one_line_errors
def export(model_path, out_path):
    """Write MODEL as ONNX: input X (rows, features); outputs label and probabilities, or predictions."""
    from distbp.run.export import export as write_onnx

    model = write_onnx(model_path, out_path)
    outputs = "predictions" if model.task == "regression" else "label, probabilities"
    click.echo(f"wrote {out_path}: input X ({count(model.spec.layers[0], 'feature')}, {model.spec.dtype}), outputs {outputs}")


@main.command(short_help="Time per step against the matrix-product ceiling.")
@click.argument("job_file", metavar="[JOB]", required=False)
@click.option("--workload", "workloads", type=click.Choice(list(WORKLOADS)), multiple=True, help="teacher (default), tiny, wide or batch512; repeat for several.")
@click.option("--max-workers", type=int, default=2, show_default=True, help="Time 1..N workers, 1 BLAS thread each.")
@click.option("--steps", type=click.IntRange(min=1), help="Timed steps per point (after warm-up); default: enough for 3 s, 10 to 2000.")
@click.option("--warmup", type=click.IntRange(min=1), default=3, show_default=True, help="Untimed steps before the timed ones.")
@click.option("--parameter-servers", type=click.IntRange(min=1), default=1, show_default=True, help="Parameter actors (slices of the parameter vector).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (its keys: docs/bench.md).")
@click.option("--model", "scaling", is_flag=True, help="Also predict time per step on 1..256 cloud workers (docs/scaling.md).")
@click.option("--bandwidth-gbit", type=float, default=10.0, show_default=True, help="Network bandwidth for --model.")
@click.option("--chart", "chart_path", help="Also draw time per step against workers into this PNG.")
@click.option("--engine", type=click.Choice(list(ENGINES)), help="The step engine (cluster.engine): direct links between the actors, or plain Ray tasks. Default: the job's, direct.")
@one_line_errors
def bench(job_file, workloads, max_workers, steps, warmup, parameter_servers, as_json, scaling, bandwidth_gbit, chart_path, engine):
    """Time per step against the matrix-product ceiling: one process and 1..N Ray workers."""
    from distbp import bench as bench_mod
    from distbp.runtime.cluster import choose_mode

    choose_mode(None)  # embedded, loopback-only Ray for every point
    log = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    names = [None] if job_file else list(workloads or ["teacher"])
    reports = [bench_mod.run(name, job_file, max_workers, steps, warmup, parameter_servers, log, engine) for name in names]
    if scaling:
        for report in reports:
            report["scaling_model"] = bench_mod.scaling_model(report, bandwidth_gbit)
    merged = bench_mod.merge(reports)
    click.echo(bench_mod.to_json(merged) if as_json else bench_mod.table(merged))
    for warning in [] if as_json else merged["warnings"]:  # in the JSON under "warnings"
        click.echo(warning, err=True)
    if scaling and not as_json:
        for report in reports:
            click.echo(bench_mod.model_table(report["scaling_model"]))
    if chart_path:
        click.echo(f"chart: {bench_mod.chart(reports, chart_path)}", err=True)


@main.group("data", short_help="Make a synthetic data set, or convert a table.")
def data_group():
    """Make synthetic data sets; convert a table to Parquet, CSV or Feather."""


@data_group.command("make", short_help="Generate a synthetic data set into a file.")
@click.argument("kind", type=click.Choice(list(KINDS)))
@click.option("--rows", type=int, help="Rows to generate (required; not for digits, which has 1,797).")
@click.option("-o", "--out", "out_path", required=True, help="Output file: .parquet, .csv or .feather.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--classes", type=int, help="Classes (spirals, blobs).")
@click.option("--features", type=int, help="Features (blobs).")
@click.option("--layers", help="Teacher widths, e.g. 784,256,128,10.")
@one_line_errors
def data_make(kind, rows, out_path, seed, classes, features, layers):
    """Generate the data set KIND into a file."""
    from distbp.data import datasets, tables

    if rows is None and kind != "digits":
        raise UsageError(f"--rows: data make {kind} needs the number of rows to make, such as --rows 1000")
    options = {"classes": classes, "features": features}
    if layers:
        try:
            options["layers"] = [int(w) for w in layers.split(",")]
        except ValueError:
            raise UsageError(f"--layers: expected widths separated by commas, such as 784,256,10; got {layers!r}") from None
    table = datasets.make_dataset(kind, rows, seed=seed, **{k: v for k, v in options.items() if v is not None})
    tables.write_table(table, out_path)
    click.echo(f"wrote {count(table.num_rows, 'row')} x {count(table.num_columns, 'column')} -> {out_path}")


@data_group.command("convert", short_help="Convert a table into one Parquet, CSV or Feather file.")
@click.argument("in_path", metavar="DATA")
@click.option("-o", "--out", "out_path", required=True, help="Output file: .parquet, .csv or .feather, by its extension.")
@click.option("--format", "in_format", type=click.Choice(["auto", "parquet", "csv", "feather"]), default="auto", show_default=True,
              help="DATA's format, when its extension does not say.")
@one_line_errors
def data_convert(in_path, out_path, in_format):
    """Convert the table DATA (a file, folder, glob or URI) into one file, streaming it."""
    from distbp.data import tables

    source = tables.open_source(in_path, in_format, key=None)  # DATA is an argument, not a job key
    if "://" not in out_path and os.path.abspath(out_path) in source.files:
        raise UsageError(f"-o {out_path}: is the input itself", hint="write to another file")
    tables.write_blocks((block for _, block in source.blocks()), source.schema, out_path)
    click.echo(f"wrote {count(source.num_rows, 'row')} x {count(len(source.columns), 'column')} -> {out_path}")
