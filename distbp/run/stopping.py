"""Early stopping: the best validation figure so far, and when patience has run out."""

import numpy as np


class EarlyStopping:
    """Tracks `rule` (metric, patience, min_delta) over evaluation rows. Its state, (best value,
    best step, evaluations since), travels in checkpoints as a 3-vector."""

    def __init__(self, rule, state=None):
        self.rule = rule
        self.value, self.step, self.since = (None, None, 0) if state is None else (float(state[0]), int(state[1]), int(state[2]))

    def update(self, row):
        """'improved', 'stop' or None for a metrics row (None too when it has no validation)."""
        if row.get("val_loss") is None:
            return None
        value = row["val_loss"] if self.rule.metric == "val_loss" else -row["val_accuracy"]
        if self.value is None or value < self.value - self.rule.min_delta:
            self.value, self.step, self.since = value, row["step"], 0
            return "improved"
        self.since += 1
        return "stop" if self.since >= self.rule.patience else None

    def state(self):
        return None if self.value is None else np.array([self.value, self.step, self.since])
