"""What `distbp run` shows while it trains.

- On a terminal: a tqdm bar with the step, loss, validation figures, steps/s and ETA; log
  lines print above it. After --resume it starts at the step resumed from; a step replayed
  after a recovery moves nothing.
- Anywhere else (a pipe, a log file, `ray job logs`): one plain line,
  `step N/TOTAL loss ... steps/s ... ETA ...`, every 10% of the steps or every 10 s, whichever
  comes first, and at the end.
- quiet: neither, and no status lines; warnings and errors always print.

With mini-batches, the loss and accuracy shown are the mean over the epoch so far (each step's
batch weighted by its rows), not the last batch's alone; metrics.csv keeps each step's own.
The bar's words are cut whole, never mid-number, to fit the terminal's width.

Steps/s and the ETA are measured over the steps this process ran (not those resumed from),
from its first step's row on, with the time each step was applied (the rows' `seconds`), so
neither the start-up, a resume, nor rows arriving a window at a time skews them.
"""

import math
import os
import sys
import time

from distbp.data import sampling

EVERY_S = 10.0  # off a terminal: a line at least this often
EVERY_FRACTION = 0.1  # ... and at every tenth of the steps
BAR = 10  # characters of the bar itself


def is_warning(message):
    return message.startswith(("warning:", "error:"))


def clock(seconds):
    """H:MM:SS."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


NAMES = ("loss", "accuracy", "val_loss", "val_accuracy", "val_rmse", "val_r2")
BAR_NAMES = ("val_loss", "val_accuracy", "val_rmse", "val_r2", "loss", "accuracy")  # what a narrow terminal cuts last
SHORT = {"accuracy": "acc", "val_accuracy": "val_acc"}  # on the bar, where width is short


def figures(row):
    """The row's loss and validation figures, as `name value` pairs."""
    return " ".join(f"{k} {row[k]:.4f}" for k in NAMES if row.get(k) is not None)


class Progress:
    """Called with every metrics row (`step`) and every log line (`log`); `close` at the end."""

    def __init__(self, stream=None, quiet=False, terminal=None, every_s=EVERY_S, now=time.monotonic, columns=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.every_s, self.now = every_s, now
        self.columns = columns  # the bar's width; None: the terminal's, read at each update
        self.batches, self.epoch_sums = None, None  # mini-batches: (training rows, batch size); the epoch's sums so far
        self.bar = None
        self.total = self.done = None  # steps in the run; the last step shown
        self.first = None  # (the step before this process's first row, when it arrived)
        self.row = None
        self.printed = None  # the step of the last plain line

    # -- log lines --------------------------------------------------------------------------
    def log(self, message):
        """A status line (dropped when quiet) or a warning (always), above the bar."""
        if self.quiet and not is_warning(message):
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    # -- steps ------------------------------------------------------------------------------
    def start(self, total, done, steps_per_epoch=None, batches=None):
        """The run has `total` steps, `done` of them before this process started (--resume).
        `batches`: (training rows, batch size) of a mini-batch run, else None."""
        self.total, self.done, self.steps_per_epoch = total, done, steps_per_epoch
        self.batches, self.epoch_sums = batches, None
        self.first = None
        self.last_line = self.now()
        self.next_mark = self._mark_after(done)
        if self.quiet or not self.terminal:
            return
        # smoothing=0: steps/s over the whole of this process's run, not a moving average of
        # the gaps between rows (which come in bursts: a window of steps at a time)
        from tqdm import tqdm

        sized = self.columns is None and self._width() > 0  # some terminals (script, CI runners) give no size
        self.bar = tqdm(
            total=total, initial=done, file=self.stream, leave=True,
            dynamic_ncols=sized, ncols=None if sized else self.columns or 100, nrows=None if sized else 24,
            bar_format=f"step {{n_fmt}}/{{total_fmt}} |{{bar:{BAR}}}| {{desc}}",  # desc: steps/s, ETA, the figures, epoch
        )

    def _mark_after(self, step):
        """The next step at a tenth of the run, after `step`."""
        tenth = self.total * EVERY_FRACTION
        return min(self.total, math.floor(step / tenth + 1e-9) * tenth + tenth) if self.total else 0

    def step(self, row):
        step = row["step"]
        if self.done is not None and step <= self.done:
            return  # a step replayed after a recovery: shown already
        if not any(k.startswith("val_") for k in row):  # between evaluations: the last figures
            row = {**row, **{k: v for k, v in (self.row or {}).items() if k.startswith("val_")}}
        if self.batches:
            row = self._epoch_mean(row)
        self.row, self.done = row, step
        if self.first is None:  # steps/s from here: the steps before it include the start-up
            self.first = (step, self._at(row))
        if self.bar is not None:
            self.bar.set_description_str(self._bar_detail(), refresh=False)
            self.bar.update(step - self.bar.n)
        elif not self.quiet and not self.terminal:
            now = self.now()
            if step >= self.next_mark or now - self.last_line >= self.every_s or step == self.total:
                self._line(now)

    def _width(self):
        """The width of the terminal the bar is drawn on (its stream's, not stdout's: a run
        piped to a file still draws on the terminal's stderr); 0 when it gives none."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, AttributeError, ValueError):  # not a terminal, or no file descriptor
            return 0

    def _epoch_mean(self, row):
        """The row with its loss and accuracy replaced by their mean over the epoch so far,
        each step weighted by its batch's rows."""
        n, batch = self.batches
        epoch, _ = sampling.epoch_and_index(row["step"], n, batch)
        if self.epoch_sums is None or self.epoch_sums[0] != epoch:
            self.epoch_sums = [epoch, 0, {}]
        rows = sampling.batch_size(row["step"], n, batch)
        self.epoch_sums[1] += rows
        sums = self.epoch_sums[2]
        for k in ("loss", "accuracy"):
            if row.get(k) is not None:
                sums[k] = sums.get(k, 0.0) + row[k] * rows
        return {**row, **{k: v / self.epoch_sums[1] for k, v in sums.items()}}

    def _at(self, row):
        """When the row's step was applied: its `seconds` (rows arrive a window at a time)."""
        return row.get("seconds", self.now())

    def _rate(self, now=None):
        steps, elapsed = self.done - self.first[0], self._at(self.row) - self.first[1]
        return steps / elapsed if steps > 0 and elapsed > 0 else None

    def _epoch(self):
        if not self.steps_per_epoch:
            return ""
        epochs = math.ceil(self.total / self.steps_per_epoch)
        return f"epoch {min(epochs, math.ceil(self.done / self.steps_per_epoch))}/{epochs}"

    def _speed(self):
        rate = self._rate()
        return f"{rate:.1f} steps/s ETA {clock((self.total - self.done) / rate)}" if rate else "-- steps/s ETA --"

    def _detail(self):
        """A plain line's words after `step N/TOTAL`: figures, epoch, steps/s and ETA."""
        return " ".join(p for p in (figures(self.row), self._epoch(), self._speed()) if p)

    def _bar_detail(self):
        """On the bar, steps/s and ETA first, then the figures (validation first) and the
        epoch, as many whole words as fit the width: nothing is cut mid-number."""
        parts = [self._speed()] + [f"{SHORT.get(k, k)} {self.row[k]:.4f}" for k in BAR_NAMES if self.row.get(k) is not None] + [self._epoch()]
        columns = self.columns or self._width() or 100
        room = columns - 1 - len(f"step {self.total}/{self.total} |{' ' * BAR}| ")
        kept = []
        for part in filter(None, parts):
            if len(" ".join(kept + [part])) > room:
                break
            kept.append(part)
        return " ".join(kept)

    def _line(self, now):
        print(f"step {self.done}/{self.total} {self._detail()}", file=self.stream, flush=True)
        self.last_line, self.printed = now, self.done
        self.next_mark = self._mark_after(self.done)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.row is not None and not self.quiet and not self.terminal and self.printed != self.done:
            self._line(self.now())  # where the run ended: early stopping, a signal, a failure
