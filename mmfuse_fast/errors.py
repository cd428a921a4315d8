"""Every error a user can cause, under one root that carries the command's exit status.

`mmfuse` catches `MMFuseError` in one place and prints its message as one line (no traceback), then exits with
`exit_code`. Each class also derives from the built-in exception a caller would expect (ValueError for bad values
and bad data, RuntimeError for run state), so `except ValueError` keeps working.

    MMFuseError                      exit 1
      ConfigError (ValueError)       exit 2  a config key is unknown, mistyped, out of range or cannot apply
      UsageError (ValueError)        exit 2  command arguments that do not fit the run (e.g. predict's --input)
      DataError (ValueError)         exit 2  a sample, file or metadata table is unusable; the message names it
        BigEarthNetDataError                   a BigEarthNet patch or its metadata
          DataFileError                        a raster file (missing, corrupt, other grid)
      RunDirError (RuntimeError)     exit 1  the run directory holds another run or cannot be used
      CheckpointError (RuntimeError) exit 1  a checkpoint is missing, broken or belongs to another config
      PackError (RuntimeError)       exit 1  a pack is incomplete or fails verification
      FetchError (RuntimeError)      exit 1  the sample could not be downloaded or did not verify
      NonFiniteLossError             exit 1  training diverged (max_bad_steps non-finite steps in a row)
      Interrupted                    exit 130 Ctrl-C outside a training loop (nothing half-written is kept)
"""

from __future__ import annotations

__all__ = ["MMFuseError", "ConfigError", "UsageError", "DataError", "BigEarthNetDataError", "DataFileError", "RunDirError",
           "CheckpointError", "PackError", "FetchError", "NonFiniteLossError", "Interrupted"]


class MMFuseError(Exception):
    """Root of the errors a user can cause; `exit_code` is the `mmfuse` exit status."""

    exit_code = 1


class ConfigError(MMFuseError, ValueError):
    """A config key is unknown, its value has the wrong type or range, or it cannot apply to this run."""

    exit_code = 2


class UsageError(MMFuseError, ValueError):
    """Command arguments that do not fit the run they address (inputs of another model, a run of another task)."""

    exit_code = 2


class DataError(MMFuseError, ValueError):
    """Input data is unusable; the message names the file, patch or split."""

    exit_code = 2


class BigEarthNetDataError(DataError):
    """A sample or its metadata is unusable; the message names the patch and the problem."""


class DataFileError(BigEarthNetDataError):
    """A data file is missing, corrupt or inconsistent with the others of its sample; the message names it."""


class RunDirError(MMFuseError, RuntimeError):
    """The run directory holds a previous run (and resume was not asked for), or cannot be used."""


class CheckpointError(MMFuseError, RuntimeError):
    """A checkpoint is missing or broken, or was written by a run with another config."""


class PackError(MMFuseError, RuntimeError):
    """A pack is incomplete, fails verification, or the output folder holds something else."""


class FetchError(MMFuseError, RuntimeError):
    """The sample could not be downloaded or did not verify."""


class NonFiniteLossError(MMFuseError, FloatingPointError):
    """The loss became NaN or infinite and stayed so for train.max_bad_steps steps."""


class Interrupted(MMFuseError, KeyboardInterrupt):
    """Ctrl-C outside a training loop."""

    exit_code = 130
