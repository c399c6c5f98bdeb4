"""The exception types distbp raises; only cli.py turns them into messages and exit codes."""


class DistbpError(Exception):
    """Base class. `str(err)` is one line: the problem, then the fix when there is one."""

    exit_code = 1
    label = "error"  # the command line's line starts "<label>: "

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())  # always one line


class UsageError(DistbpError):
    """Bad job file, bad data or a bad argument: exit code 2."""

    exit_code = 2


class JobError(UsageError):
    """A job-file key is missing, unknown or holds a bad value."""


class DataError(UsageError):
    """A data file is missing, unreadable, or its columns or values do not fit the job."""


class TrainingError(DistbpError):
    """Training failed: divergence, too many worker failures, a lost parameter actor."""


class ConnectError(DistbpError):
    """Joining an existing Ray cluster failed."""


class WriteFailed(OSError):
    """A file that could not be written (a full disk, no permission): `filename` is the file
    asked for, whose earlier version, if any, is kept as it was; no temporary file is left.
    The command line prints it in one line and exits 1."""
