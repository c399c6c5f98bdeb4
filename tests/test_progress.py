"""What a run shows while it trains: the plain lines off a terminal (when, and what they say),
the bar's start after a resume, replays, --quiet and warnings. The clock is a plain function
the test advances, so nothing here depends on how fast the machine is."""

import io

import pytest

from distbp.run.progress import Progress, clock


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def rows(first, last, per_step_s=0.01, val_every=None):
    for step in range(first, last + 1):
        row = {"step": step, "loss": 1.0 / step, "accuracy": 0.5, "seconds": 5.0 + step * per_step_s}
        if val_every and step % val_every == 0:
            row.update(val_loss=2.0 / step, val_accuracy=0.25)
        yield row


def plain(total=100, done=0, **kw):
    out, now = io.StringIO(), Clock()
    progress = Progress(out, terminal=False, now=now, **kw)
    progress.start(total, done)
    return progress, out, now


def test_off_a_terminal_a_line_at_every_tenth_of_the_steps_and_at_the_end():
    progress, out, _ = plain(total=100)
    for row in rows(1, 100):
        progress.step(row)
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{s}/100" for s in range(10, 101, 10)]
    assert lines[0].startswith("step 10/100 loss 0.1000 accuracy 0.5000 ")


def test_steps_per_second_and_eta_come_from_the_steps_applied_times():
    progress, out, _ = plain(total=1000)
    for row in rows(1, 100, per_step_s=0.02):  # 50 steps/s, whatever the wall clock says
        progress.step(row)
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("step 100/1000") and "50.0 steps/s ETA 0:00:18" in line, line


def test_off_a_terminal_a_line_every_10_seconds_between_tenths():
    progress, out, now = plain(total=1000)
    for row in rows(1, 30):
        now.t += 1.0  # 1 s per step: the first tenth (step 100) is 100 s away
        progress.step(row)
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["10/1000", "20/1000", "30/1000"]


def test_a_resumed_run_counts_from_its_step_and_a_replayed_step_moves_nothing():
    progress, out, _ = plain(total=100, done=40)
    for row in [*rows(41, 55), *rows(48, 60)]:  # 48..55 replayed after a recovery
        progress.step(row)
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["50/100", "60/100"]
    assert "steps/s" in lines[0] and "ETA" in lines[0]


def test_validation_figures_and_the_epoch_show_in_the_line():
    out, now = io.StringIO(), Clock()
    progress = Progress(out, terminal=False, now=now)
    progress.start(40, 0, steps_per_epoch=10)
    for row in rows(1, 40, val_every=4):
        progress.step(row)
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("step 40/40 loss 0.0250 accuracy 0.5000 val_loss 0.0500 val_accuracy 0.2500 epoch 4/4 ")


def test_the_end_of_a_run_stopped_early_gets_its_line():
    progress, out, _ = plain(total=100)
    for row in rows(1, 37):
        progress.step(row)
    progress.close()
    assert out.getvalue().splitlines()[-1].startswith("step 37/100")


def test_quiet_shows_no_progress_or_status_but_every_warning():
    out = io.StringIO()
    progress = Progress(out, quiet=True, terminal=False)
    progress.log("made spirals data: 3000 rows -> x.parquet")
    progress.start(10, 0)
    for row in rows(1, 10):
        progress.step(row)
    progress.log("warning: resuming with 1 workers instead of 2: results will differ within float tolerance")
    progress.close()
    assert out.getvalue().splitlines() == ["warning: resuming with 1 workers instead of 2: results will differ within float tolerance"]


def test_on_a_terminal_log_lines_print_above_the_bar():
    out = io.StringIO()
    progress = Progress(out, terminal=True)
    progress.start(100, 20)
    progress.step(next(rows(21, 21)))
    progress.log("warning: worker 1 lost; starting a replacement")
    progress.close()
    text = out.getvalue()
    assert "step 21/100" in text
    # the warning has a line of its own: the bar is cleared before it and drawn again after
    assert any(line.strip() == "warning: worker 1 lost; starting a replacement" for line in text.replace("\r", "\n").splitlines())


@pytest.mark.parametrize("columns", [80, 60, 40])
def test_the_bar_fits_the_width_and_cuts_whole_figures_never_a_number(columns):
    out = io.StringIO()
    progress = Progress(out, terminal=True, columns=columns)
    progress.start(20000, 0, steps_per_epoch=100)
    row = {"step": 1234, "loss": 0.123456, "accuracy": 0.959, "seconds": 9.0,
           "val_loss": 0.25, "val_accuracy": 0.959, "val_rmse": 1.5, "val_r2": 0.75}
    progress.step({**row, "step": 1, "seconds": 1.0})
    progress.step(row)
    progress.close()
    drawn = [line for line in out.getvalue().replace("\r", "\n").splitlines() if line.startswith("step 1234/")]
    assert drawn, out.getvalue()
    for line in drawn:
        assert len(line.rstrip()) <= columns, (len(line), line)
        words = line.split("| ", 1)[1].split()
        for name, value in zip(words[::2], words[1::2]):  # name value pairs, each value whole
            if name.startswith(("val_", "loss", "acc")):
                assert len(value.split(".")[-1]) == 4, line
    if columns == 80:  # after steps/s and the ETA, the validation figures come first
        assert drawn[-1].rstrip().endswith("| 154.1 steps/s ETA 0:02:02 val_loss 0.2500"), drawn[-1]


def test_with_mini_batches_the_loss_shown_is_the_epoch_mean_weighted_by_rows():
    out = io.StringIO()
    progress = Progress(out, terminal=False, now=Clock())
    progress.start(6, 0, steps_per_epoch=3, batches=(10, 4))  # batches of 4, 4 and 2 rows per epoch
    losses = [1.0, 2.0, 4.0, 8.0, 8.0, 2.0]
    for step, loss in enumerate(losses, start=1):
        progress.step({"step": step, "loss": loss, "accuracy": 0.5, "seconds": float(step)})
    progress.close()
    lines = out.getvalue().splitlines()
    by_step = {int(line.split()[1].split("/")[0]): line for line in lines}
    assert by_step[3].startswith(f"step 3/6 loss {(4 * 1 + 4 * 2 + 2 * 4) / 10:.4f} accuracy 0.5000 epoch 1/2")
    assert by_step[4].startswith("step 4/6 loss 8.0000")  # a new epoch starts its own mean
    assert by_step[6].startswith(f"step 6/6 loss {(4 * 8 + 4 * 8 + 2 * 2) / 10:.4f}")


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05")])
def test_clock(seconds, text):
    assert clock(seconds) == text
