"""The driver loop. Start or join Ray, start the actors, then window by window: hand the engine
the orders of the next steps, write each applied step's metrics row, evaluate early stopping,
checkpoint, and at the end write the model. What each of those does lives in its own module: checks (the job
against its data), actors (creating them), engine (carrying out a step), recovery (failures),
outputs (the run folder). The driver holds no backprop math and no data."""

import signal
import time
from typing import NamedTuple

import numpy as np

from distbp import faults
from distbp.backprop import nn, schedule
from distbp.data import sampling
from distbp.data.checks import ensure_data, prepare
from distbp.errors import DistbpError, TrainingError
from distbp.run.model import Model
from distbp.run.outputs import RunOutputs, RunResult
from distbp.run.stopping import EarlyStopping
from distbp.runtime import cluster, engine
from distbp.runtime.actors import Actors, Start
from distbp.runtime.calls import recoverable
from distbp.runtime.messages import Order, figures, rows_of
from distbp.runtime.recovery import Recovery
from distbp.text import count


class Recorded(NamedTuple):
    """The last step whose metrics row was recorded, and that row (None before the first)."""

    step: int
    row: dict | None


class RunStart(NamedTuple):
    """What `on_start` gets once the data is read, before the first step."""

    total_steps: int
    done: int  # steps done before this run (a resumed run's checkpoint step), else 0
    steps_per_epoch: int | None  # epoch jobs
    batches: tuple | None  # (training rows, batch size) with mini-batches, else None


class Trainer:
    """One run of a job. `run()` returns a RunResult; errors are DistbpError subclasses.
    `log` gets warnings and notices; `detail` gets the set-up and phase lines (--verbose)."""

    def __init__(self, job, resume=False, force=False, log=None, on_step=None, detail=None, signals=False, source=None, keep_ray=False, on_start=None):
        self.job = job
        self.log = log or (lambda msg: None)
        self.detail = detail or (lambda msg: None)
        self.on_step = on_step or (lambda row: None)
        self.on_start = on_start or (lambda start: None)  # a RunStart, once the data is read
        self.outputs = RunOutputs(job, resume, force, self.log)
        self.stop_requested = None  # a signal number: checkpoint after the current step and stop
        self.signals = signals  # catch SIGINT and SIGTERM (the command line does; main thread only)
        self.source = source  # rows from elsewhere than data.path: a ray.data.Dataset's BlockSource
        self.keep_ray = keep_ray  # leave an embedded Ray running for the next run of this process
        self.starting = None  # during start-up: the step a signal leaves the run at (0, or the checkpoint's)
        self.last = Recorded(0, None)
        self.actors = self.engine = self.recovery = None
        self.stopper = self.model = None  # early stopping (when the job has it); the model being trained
        self.resumed_from = None  # the checkpoint step a resumed run started from
        self.t0 = self.t_loop = 0.0  # the clock `seconds` counts from; when the loop started (perf_counter)
        self.stop_at = None  # where early stopping ended the run
        self.phases = {}  # seconds: imports, ray_start, actor_start, data_read, first_step, plot, shutdown

    # what tests and tools reach for
    workers = property(lambda self: self.actors.workers if self.actors else [])
    servers = property(lambda self: self.actors.servers if self.actors else [])
    replacements = property(lambda self: self.recovery.replacements if self.recovery else 0)

    def setup(self, prep, ckpt=None):
        """Start the actors, read and check the shards, and start the parameter actors from
        the seeded init or from `ckpt`. Needs Ray; touches nothing on disk."""
        job, spec = self.job, prep.spec
        # Idle actors wait for the next run on a Ray that distbp started and keeps for this
        # process (distbp.init, distbp.train, the estimators), whichever kind of run parks them.
        reuse = cluster.holds_embedded()
        self.actors = Actors(job, prep, self.phases, self.log, reuse=reuse)
        if ckpt is None:
            start = Start(nn.init_params(spec, np.random.default_rng(job.seed)))
        else:
            start = Start(ckpt.params, ckpt.opt_state, ckpt.step, ckpt.best_params)
        self.actors.start(start)
        rule = job.train.early_stopping
        self.stopper = EarlyStopping(rule, ckpt.stopping if ckpt else None) if rule else None
        classes = self.actors.classes if job.data.task == "classification" else []
        self.model = Model(spec, None, job.data.task, prep.features, prep.labels, classes, self.actors.mean, self.actors.std)

    def close(self):
        """Stop this run's engine and actors."""
        if self.engine is not None:
            self.engine.close()
        if self.actors is not None:
            self.actors.close()

    def run(self):
        job, outputs = self.job, self.outputs
        engine_class = engine.chosen(job)
        ckpt = outputs.start_checkpoint()
        model_only = ckpt is not None and ckpt.finished and not outputs.has_model()  # its model write failed
        if ckpt is not None and ckpt.finished and not model_only:
            return RunResult(outputs.where(""), outputs.where("model.npz"), None, ckpt.step, already_finished=True)
        if model_only:
            self.log(f"writing {outputs.where('model.npz')} from the final checkpoint of step {ckpt.step}; nothing is trained again")
        elif ckpt is not None:
            self.log(f"resuming {outputs.where('')} from the checkpoint of step {ckpt.step}")
        if self.source is None:
            ensure_data(job, self.log)
        prep = prepare(job, self.source)
        self.starting = ckpt.step if ckpt else 0  # until the run folder is begun, a signal stops at once
        saved = self._catch_signals()
        started = False
        try:
            try:
                started = self._connect(job.cluster)
            except SystemExit as err:  # ray.init's own SIGTERM handler, while Ray starts
                if err.code != signal.SIGTERM:
                    raise
                raise StoppedAtStart(signal.SIGTERM, self.starting) from None
            self._catch_signals()  # again: ray.init sets a SIGTERM handler of its own
            faults.hit("pause_ray")
            cluster.check_capacity(job.cluster.workers, job.cluster.cpus_per_worker)
            self.setup(prep, ckpt)
            self.resumed_from = ckpt.step if ckpt else None
            self.engine = engine_class(self.actors)
            self.recovery = Recovery(job, self.actors, outputs, self._save_applied, self.log)
            faults.hit("pause_actors")
            self.starting = None  # the run folder changes from here; a signal checkpoints after a step
            outputs.begin(self._columns(), ckpt.step if ckpt else None)
            outputs.record_environment(self.actors.blas)
            if self.stop_requested:  # it came while the folder was begun: no step is trained
                if ckpt is None:
                    outputs.undo_begin()
                raise StoppedAtStart(self.stop_requested, ckpt.step if ckpt else 0)
            links = self.engine.congestion  # what the engine's TCP links use
            self.detail(
                f"setup: {count(len(self.workers), 'worker')}, {count(len(self.servers), 'parameter actor')}, "
                f"{count(self.actors.n_train, 'training row')}, {count(prep.spec.num_params, 'parameter')}, engine {self.engine.name}"
                + (f" (TCP {' and '.join(links)})" if links else "")
            )
            if model_only:
                result = self._model_only(ckpt)
            else:
                batch = job.train.batch
                self.on_start(RunStart(self.actors.total_steps, ckpt.step if ckpt else 0, self.actors.steps_per_epoch,
                                       None if batch == "full" else (self.actors.n_train, int(batch))))
                result = self._loop(ckpt.step + 1 if ckpt else 1)
        finally:
            t = time.perf_counter()
            self.close()
            if started:
                import ray

                cluster.stop(ray)
            self.phases["shutdown"] = time.perf_counter() - t
            plot = outputs.plot_done()  # drawn while the actors and Ray shut down
            outputs.close()
            self._restore_signals(saved)
        result.plot_path = plot
        return result

    def _connect(self, c):
        """Start or join Ray. True when this run started it and is to shut it down: the command
        line's runs do; the Python API's keep it for the next call (cluster.keep)."""
        connect = cluster.keep if self.keep_ray else cluster.connect
        return connect(c.address, c.workers * c.cpus_per_worker, c.connect_timeout_s, self.phases, beside=self.outputs.prepare_plot)

    def _catch_signals(self):
        """SIGINT and SIGTERM: checkpoint after the step under way, then stop (Interrupted,
        exit 128 + signal). A second one stops at once (SecondSignal), with the checkpoints
        already written kept. During start-up (Ray, the actors, the data) one stops at once
        (StoppedAtStart): nothing is trained or written. Returns the handlers it replaced
        (None when not catching)."""
        if not self.signals:
            return None

        def on_signal(signum, frame):
            if self.starting is not None:
                raise StoppedAtStart(signum, self.starting)
            if self.stop_requested:
                raise SecondSignal(signum, self.last.step)
            self.stop_requested = signum

        return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signals(self, saved):
        for s, handler in (saved or {}).items():
            signal.signal(s, handler)

    def _columns(self):
        L, task = self.actors.spec.num_layers, self.job.data.task
        columns = ["step", "loss"] + (["accuracy"] if task == "classification" else []) + ["seconds", "lr", "workers"]
        if self.actors.has_val:
            columns += ["val_loss"] + (["val_accuracy"] if task == "classification" else ["val_rmse", "val_r2"])
        return columns + [f"grad_norm_{l}" for l in range(1, L + 1)] + [f"delta_mean_{l}" for l in range(1, L + 1)]

    def _order(self, step):
        train, total = self.job.train, self.actors.total_steps
        evaluate = step % train.eval_every == 0 or step == total
        lr = schedule.learning_rate(step, train.optimizer.lr, train.schedule, total)
        rows = sampling.batch_size(step, self.actors.n_train, None if train.batch == "full" else int(train.batch))
        return Order(step, lr, evaluate, evaluate and self.stopper is not None, rows)

    def _barrier(self, step, keep=False):
        """Whether the driver must act once `step` is applied, before any later step runs: a
        checkpoint, the end, or (`keep`) an early-stopping evaluation or the step it stopped at."""
        return step % self.job.train.checkpoint_every == 0 or step == self.actors.total_steps or keep

    def _ends_window(self, order):
        return self._barrier(order.step, order.keep)

    def _window(self, step, size):
        """Orders for steps step.. : `size` of them at most, ending at the first that ends a window."""
        orders = []
        while step <= self.actors.total_steps and len(orders) < size:
            orders.append(self._order(step))
            if self._ends_window(orders[-1]):
                break
            step += 1
        return orders

    def _loop(self, first):
        self.t0 = time.time() - self.outputs.metrics.last_seconds
        self.t_loop = time.perf_counter()
        self.last = Recorded(first - 1, None)
        self.stop_at = None
        stream = engine.Stream(self.engine, self._window, self._ends_window)
        step = first
        while True:
            try:
                orders, results = stream.read(step, hold=bool(self.stop_requested))
                for order, infos in zip(orders, results):
                    self._record(order, infos)
                step = orders[-1].step + 1
                if stream.in_flight and self.stop_requested:  # checkpoint after the window ahead
                    continue
                result = self._after(orders[-1].step)
                if result is not None:
                    return result
                if not stream.in_flight and self.recovery.grow():  # between windows: nothing in flight
                    self.engine.rebuild()
            except recoverable() as err:
                stream.drop()
                step, result = self._recover(err)
                if result is not None:
                    return result

    def _recover(self, err):
        """Bring the actors back after `err`, and after any failure met on the way (each one
        counts against cluster.max_failures). Returns (the step to go on from, the RunResult
        when the run ended on the way, else None)."""
        while True:
            try:
                step, restored, ckpt = self.recovery.recover(err)
                if restored:
                    self.outputs.open_metrics(step - 1)  # the replayed steps' rows are written again
                    self.last, self.stop_at = Recorded(step - 1, None), None
                    if self.stopper is not None:  # back to the checkpoint's best so far
                        self.stopper = EarlyStopping(self.job.train.early_stopping, ckpt.stopping if ckpt else None)
                else:  # rows of steps applied before the failure, then on from the next
                    self._record_applied()
                    if self.last.row is not None and self._barrier(self.last.step, self.stop_at == self.last.step):
                        result = self._after(self.last.step)  # its checkpoint or end is still to do
                        if result is not None:
                            return step, result
                self.engine.rebuild()
                return step, None
            except recoverable() as again:
                err = again

    def _record(self, order, infos):
        row = self.outputs.row(order, infos, self.actors.spec, self.actors.bounds, self.job.data.task, self.t0, self.actors.sst)
        self.phases.setdefault("first_step", time.perf_counter() - self.t_loop)
        self.last = Recorded(order.step, row)
        self.on_step(row)
        if self._early_stop(order, row):
            self.stop_at = order.step

    def _record_applied(self):
        """Rows of the steps the parameter actors applied but the driver has not yet read."""
        for infos in self.actors.infos_after(self.last.step):
            self._record(self._order(infos[0].step), infos)

    def _save_applied(self):
        """Before giving up: the rows and a checkpoint of every step applied."""
        self._record_applied()
        return self._checkpoint(self.last.step, done=False)


    def _after(self, step):
        """After step `step` is recorded: finish, checkpoint or stop on a signal, as due."""
        row = self.last.row
        if step == self.actors.total_steps or (self.stop_at is not None and not self.stop_requested):
            return self._finish(step, row, early=step != self.actors.total_steps)
        if step % self.job.train.checkpoint_every == 0 or self.stop_requested:
            path = self._checkpoint(step, done=False)
            if self.stop_requested:
                raise Interrupted(self.stop_requested, step, path)
        return None

    def _early_stop(self, order, row):
        if self.stopper is None or not order.evaluate:
            return False
        verdict = self.stopper.update(row)
        if verdict == "improved":
            self.actors.promote(order.step)
        elif verdict == "stop":
            self.log(f"early stopping at step {order.step}: best {self.stopper.rule.metric} at step {self.stopper.step}")
            return True
        return False

    def _checkpoint(self, step, done, snap=None):
        snap = snap or self.actors.snapshot()
        record = self.stopper.state() if self.stopper is not None else None
        return self.outputs.checkpoint(step, snap, record, done, len(self.workers))

    def _finish(self, step, row, early):
        """model.npz first, then the checkpoint marked done. When model.npz cannot be
        written, the final checkpoint is still written (marked done), and --resume writes
        model.npz from it without training again."""
        snap = self.actors.snapshot()
        best_step = self.stopper.step if self.stopper is not None and snap.best_params is not None else None
        saved = snap.params if best_step is None else snap.best_params
        final = self._final(saved, row)
        try:
            self.outputs.write_model(self.model, saved)
        except OSError as err:
            raise self._model_unwritten(err, step, snap) from None
        faults.hit("model_written")
        path = self._checkpoint(step, done=True, snap=snap)
        self.outputs.finish(self.phases)
        return RunResult(
            self.outputs.where(""), self.outputs.where("model.npz"), path, step, final, resumed_from=self.resumed_from,
            replacements=self.replacements, stopped_early=early, engine=self.engine.name, phases=self.phases,
            last_row={k: row[k] for k in self.outputs.columns if row.get(k) is not None}, best_step=best_step,
        )

    def _model_unwritten(self, err, step, snap):
        """The error for a model.npz that could not be written, after keeping the final
        checkpoint when that can still be written."""
        message = f"cannot write {self.outputs.where('model.npz')}: {err.strerror or err}"
        try:
            path = self._checkpoint(step, done=True, snap=snap)
        except TrainingError as also:
            return TrainingError(f"{message}; {also.message}", hint=also.hint)
        return TrainingError(
            message,
            hint=f"the final checkpoint of step {step} is kept ({path}); free the space or fix the folder, then --resume writes model.npz without training again",
        )

    def _model_only(self, ckpt):
        """--resume of a run whose final checkpoint was written but not its model.npz:
        write model.npz (and its figures) from the checkpoint, training nothing."""
        row = {"step": ckpt.step, "seconds": self.outputs.metrics.last_seconds}
        for name, text in (self.outputs.metrics.last_row or {}).items():  # its numbers, as the run recorded them
            try:
                row[name] = int(text) if name in ("step", "workers") else float(text)
            except (TypeError, ValueError):  # an empty or edited cell: left out
                pass
        self.last = Recorded(ckpt.step, row)
        return self._finish(ckpt.step, row, early=ckpt.step != self.actors.total_steps)

    def _final(self, params, row):
        """The weights model.npz will hold, measured over every training row and every
        validation row (forward pass only): loss and accuracy, or loss, rmse and r2 for
        regression, each also as val_*; `seconds` of training. All Python floats."""
        train, val = self.actors.evaluate(params)
        task, targets, sst = self.job.data.task, self.actors.spec.layers[-1], self.actors.sst
        final = figures(train, task, targets, sst.get("train"))
        if val is not None and rows_of(val):
            final.update(figures(val, task, targets, sst.get("val"), prefix="val_"))
        final["seconds"] = float(row["seconds"])
        return final


class Interrupted(DistbpError):
    """The run stopped on a signal after writing a checkpoint; exit code 128 + signal."""

    label = "stopped"  # asked for, not a failure

    def __init__(self, signum, step, path):
        super().__init__(f"signal {signum} after step {step}; checkpoint {path}", hint="continue with --resume")
        self.exit_code = 128 + signum


class StoppedAtStart(DistbpError):
    """A signal before the first step: the run stops at once, having trained and written
    nothing (a resumed run's checkpoints are untouched); exit code 128 + signal."""

    label = "stopped"  # asked for, not a failure

    def __init__(self, signum, step):
        where = f"; the checkpoint of step {step} is untouched" if step else "; nothing was trained or written"
        super().__init__(f"signal {signum} during start-up{where}", hint="continue with --resume" if step else None)
        self.exit_code = 128 + signum


class SecondSignal(DistbpError):
    """A second signal while the run was stopping: it stops at once; exit code 128 + signal."""

    label = "stopped"  # asked for, not a failure

    def __init__(self, signum, step):
        super().__init__(
            f"a second signal {signum} after step {step}, before the checkpoint under way was written",
            hint="the checkpoints written before are kept; continue with --resume",
        )
        self.exit_code = 128 + signum

