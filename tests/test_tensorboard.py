"""output.tensorboard: the event files in tb/ hold every metrics.csv value, once per step, also
after a replay (a parameter actor restored) and a --resume, read back the way TensorBoard reads
them (a SessionLog START at step s hides every earlier point from step s on)."""

import csv
import glob
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog

from distbp import faults
from distbp.api import load
from distbp.run.outputs import RunOutputs
from distbp.trainer import Trainer


def events(folder):
    """Every Event of every event file in `folder`, file by file in name order, as TensorBoard
    reads them."""
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            blob = f.read()
        at = 0
        while at < len(blob):  # TFRecord: length, its crc, the data, its crc
            (length,) = struct.unpack_from("<Q", blob, at)
            yield Event.FromString(blob[at + 12 : at + 12 + length])
            at += 12 + length + 4


def shown(folder):
    """{tag: {step: value}} as TensorBoard shows it, and how many points were written twice
    without a purge between them."""
    points, doubled = {}, 0
    for event in events(folder):
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            for tag in points:
                points[tag] = {s: v for s, v in points[tag].items() if s < event.step}
        for value in event.summary.value:
            doubled += event.step in points.setdefault(value.tag, {})
            points[value.tag][event.step] = value.simple_value
    return points, doubled


def check_against_metrics(out):
    points, doubled = shown(out / "tb")
    assert doubled == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c not in ("step", "seconds")]
    assert set(points) == {c for c in columns if any(r[c] for r in rows)}
    for column in points:
        want = {int(r["step"]): np.float32(float(r[column])) for r in rows if r[column]}
        assert points[column] == pytest.approx(want, rel=0, abs=0), column
    return points


def test_scalars_match_metrics_csv(ray_session, make_job):
    job = make_job(name="tb", rows=200, data={"validation": 0.25}, output={"tensorboard": True},
                   train={"steps": 12, "eval_every": 4, "checkpoint_every": 100})
    result = Trainer(load(job)).run()
    points = check_against_metrics(__import__("pathlib").Path(result.out_dir))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "grad_norm_1", "delta_mean_1"} <= set(points)
    assert sorted(points["loss"]) == list(range(1, 13)) and sorted(points["val_loss"]) == [4, 8, 12]


def test_a_replay_and_a_resume_leave_no_duplicate_or_stale_point(ray_session, make_job, tmp_path, monkeypatch):
    job = make_job(name="tbr", rows=200, output={"tensorboard": True}, train={"steps": 12, "checkpoint_every": 3, "eval_every": 2})
    faults._fired.clear()
    monkeypatch.setenv(faults.ENV, "snapshot")  # parameter actor lost at the first checkpoint: steps replayed
    first = Trainer(load(job)).run()
    assert first.replacements == 1
    check_against_metrics(tmp_path / "runs" / "tbr")
    monkeypatch.setenv(faults.ENV, "checkpoint_write@9")  # stops after step 9, with the checkpoint of step 6
    faults._fired.clear()
    out = tmp_path / "again"
    with pytest.raises(Exception, match="cannot write the checkpoint of step 9"):
        Trainer(load(job, [f"output.dir={out}"])).run()
    monkeypatch.delenv(faults.ENV)
    resumed = Trainer(load(job, [f"output.dir={out}"]), resume=True).run()
    assert resumed.resumed_from == 6
    points = check_against_metrics(out)
    assert sorted(points["loss"]) == list(range(1, 13))


def test_a_file_reopened_within_the_same_second_keeps_the_first(tmp_path):
    """tensorboardX names a file by the second it was opened; a replay reopens within
    milliseconds. Both files must stay, and read in name order the purge must leave the first
    file's points before the replayed step."""
    outputs = object.__new__(RunOutputs)  # only the run folder and the writer are needed here
    outputs.out_dir, outputs.tb = str(tmp_path), None
    outputs._open_tensorboard(None)
    for step in (1, 2, 3):
        outputs.tb.add_scalar("loss", float(step), step)
    outputs._open_tensorboard(2)  # steps 3.. are written again
    outputs.tb.add_scalar("loss", 30.0, 3)
    outputs.tb.close()
    assert len(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))) == 2
    points, doubled = shown(tmp_path / "tb")
    assert points["loss"] == {1: 1.0, 2: 2.0, 3: 30.0} and doubled == 0
