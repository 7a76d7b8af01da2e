"""The two ways a training run refuses to go on, each with a message that names the problem."""


class TrainingConfigError(ValueError):
    """Bad input found before any training step: an argument, the data, the model folder or a checkpoint.
    The CLI prints `error: <message>` and exits with status 2."""


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm stopped being finite. The run stops before the optimizer applies the
    step, saves nothing more, and the latest checkpoint (the last good state) stays as it was. The CLI
    prints `error: <message>` and exits with status 1."""
