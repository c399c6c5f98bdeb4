"""Tests for distbp.run.plot: a synthetic metrics.csv drawn into a PNG."""

import csv
import math
import os
import subprocess
import sys

import pytest

from distbp.errors import UsageError

from conftest import write_job

pytest.importorskip("matplotlib")
from distbp.run.plot import figure, plot_run  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(folder, steps=60, eval_every=10, layers=2, classification=True, validation=True):
    """A metrics.csv like a run writes: evaluation columns empty except every `eval_every` steps."""
    header = ["step", "loss"] + (["accuracy"] if classification else []) + ["seconds", "lr", "workers"]
    if validation:
        header += ["val_loss"] + (["val_accuracy"] if classification else ["val_rmse", "val_r2"])
    header += [f"{k}_{l}" for l in range(1, layers + 1) for k in ("grad_norm", "delta_mean")]
    rows = []
    for step in range(1, steps + 1):
        loss = 2.0 * math.exp(-step / 20) + 0.05
        row = {"step": step, "loss": f"{loss:.6g}", "accuracy": f"{1 - loss / 2.1:.4f}",
               "seconds": f"{0.01 * step:.3f}", "lr": f"{0.01 * 0.5 ** (step // 20):.6g}", "workers": 2}
        evaluation = step % eval_every == 0
        if validation:
            row["val_loss"] = f"{loss * 1.1:.6g}" if evaluation else ""
            row["val_accuracy"] = f"{1 - loss / 2.0:.4f}" if evaluation else ""
            row["val_rmse"] = f"{math.sqrt(2 * loss):.6g}" if evaluation else ""
            row["val_r2"] = f"{1 - loss:.4f}" if evaluation else ""
        for l in range(1, layers + 1):
            row[f"grad_norm_{l}"] = f"{l * math.exp(-step / 30):.6g}" if evaluation else ""
            row[f"delta_mean_{l}"] = f"{0.1 / l * math.exp(-step / 40):.6g}" if evaluation else ""
        rows.append(row)
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def assert_png(path, min_bytes=10_000):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG)
    assert len(data) > min_bytes
    return data


def test_plot_a_classification_run(tmp_path):
    write_metrics(tmp_path)
    out = plot_run(tmp_path)
    assert out == os.path.join(str(tmp_path), "plot.png")
    assert_png(out)
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "plot.png"]  # no temporary file left


def test_plot_to_a_chosen_path_replaces_it(tmp_path):
    write_metrics(tmp_path, layers=3)
    target = tmp_path / "figure.png"
    target.write_bytes(b"old")
    assert plot_run(str(tmp_path), target) == str(target)
    assert_png(target)
    assert not (tmp_path / "plot.png").exists()


def drawn(fig):
    """{panel's y label: {line label: (xs, ys)}} of a figure, twin axes under their own label."""
    return {ax.get_ylabel(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()} for ax in fig.axes}


def test_plot_a_regression_run_without_validation(tmp_path):
    write_metrics(tmp_path, classification=False, validation=False, layers=1)
    assert_png(plot_run(tmp_path))
    panels = drawn(figure(str(tmp_path)))
    assert set(panels["loss (log scale)"]) == {"train loss"} and "r2" not in panels and "accuracy" not in panels


def test_the_loss_axis_is_logarithmic_and_regression_draws_rmse_and_r2(tmp_path):
    write_metrics(tmp_path, classification=False, validation=True, layers=1, eval_every=10)
    fig = figure(str(tmp_path))
    loss_axis = fig.axes[0]
    assert loss_axis.get_yscale() == "log"
    panels = drawn(fig)
    assert set(panels["loss (log scale)"]) == {"train loss", "validation loss", "validation rmse"}
    steps, rmse = panels["loss (log scale)"]["validation rmse"]
    assert steps == list(range(10, 61, 10))  # the evaluation rows only
    assert rmse == pytest.approx([math.sqrt(2 * (2.0 * math.exp(-s / 20) + 0.05)) for s in steps], rel=1e-5)
    assert set(panels["r2"]) == {"validation r2"}


def test_a_classification_run_draws_accuracy_on_the_twin_axis(tmp_path):
    write_metrics(tmp_path)
    panels = drawn(figure(str(tmp_path)))
    assert set(panels["loss (log scale)"]) == {"train loss", "validation loss"}
    assert set(panels["accuracy"]) == {"train accuracy", "validation accuracy"}
    assert panels["learning rate"]
    assert {"‖grad W1‖", "mean |delta 1|", "‖grad W2‖", "mean |delta 2|"} <= set(panels["per layer (log scale)"])


def test_a_loss_of_zero_keeps_a_linear_axis(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss,seconds,lr\n1,0.7,0.01,0.1\n2,0.0,0.02,0.1\n")
    assert figure(str(tmp_path)).axes[0].get_yscale() == "linear"


def test_plot_without_layer_columns_and_with_a_single_row(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss,seconds,lr\n1,0.7,0.01,0.1\n")
    assert_png(plot_run(tmp_path), min_bytes=5_000)


def test_layers_are_drawn_from_the_evaluation_rows(tmp_path):
    # the grad-norm panel exists only when the columns hold values: the figure gets taller
    write_metrics(tmp_path, layers=2)
    with_layers = assert_png(plot_run(tmp_path, tmp_path / "a.png"))
    write_metrics(tmp_path, layers=0)
    without = assert_png(plot_run(tmp_path, tmp_path / "b.png"))
    height = lambda png: int.from_bytes(png[20:24], "big")  # noqa: E731 (the IHDR chunk)
    assert height(with_layers) > height(without)


def test_missing_metrics_names_the_file(tmp_path):
    with pytest.raises(UsageError, match="metrics.csv"):
        plot_run(tmp_path)
    assert not (tmp_path / "plot.png").exists()


def test_empty_metrics_is_a_usage_error(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss,seconds,lr\n")
    with pytest.raises(UsageError, match="no steps"):
        plot_run(tmp_path)


def test_a_bad_cell_is_a_usage_error(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss,seconds,lr\n1,oops,0.1,0.1\n")
    with pytest.raises(UsageError, match="loss"):
        plot_run(tmp_path)


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes `import` fail
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError) as info:
        plot_run(tmp_path)
    assert "matplotlib is not installed" in str(info.value)
    assert info.value.hint == "distbp needs it for plots: pip install 'matplotlib>=3.7,<4'"
    assert not (tmp_path / "plot.png").exists()


def test_importing_the_module_needs_no_matplotlib_ray_or_click():
    """(numpy it may load: its atomic write comes from run.checkpoint, and matplotlib, which
    draws the plot, needs numpy anyway.)"""
    code = ("import sys; sys.modules['matplotlib'] = None; import distbp.run.plot; "
            "print([m for m in ('ray', 'click', 'matplotlib') if sys.modules.get(m) is not None])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("plot", [True, False])
def test_prepare_plot_imports_matplotlib_in_a_thread_and_nothing_without_a_plot(tmp_path, plot):
    """RunOutputs.prepare_plot (which the trainer passes to cluster.connect as `beside`, to run
    while Ray starts) loads what plot_run needs in a background thread, and nothing for a run
    without a plot (output.plot: false)."""
    job = write_job(tmp_path, output={"dir": str(tmp_path / "runs" / "t"), "plot": plot})
    code = (
        "import sys, threading; from distbp.api import load; from distbp.run.outputs import RunOutputs; "
        f"RunOutputs(load({str(job)!r}), False, False, print).prepare_plot(); "
        "[t.join() for t in threading.enumerate() if t.name == 'distbp-plot-import']; "
        "print(sorted(m for m in ('matplotlib.figure', 'matplotlib.backends.backend_agg') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("['matplotlib.backends.backend_agg', 'matplotlib.figure']" if plot else "[]")
