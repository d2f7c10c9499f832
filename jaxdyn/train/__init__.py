"""The trainer: `python -m jaxdyn.train --config configs/<exp>.py[:preset] --workdir DIR`."""

from jaxdyn.train.loop import (
    CheckpointMismatchError,
    NonFiniteLossError,
    TrainState,
    abstract_train_state,
    create_train_state,
    evaluate,
    main,
    make_eval_step,
    make_train_step,
    train_and_evaluate,
)

__all__ = ["CheckpointMismatchError", "NonFiniteLossError", "TrainState",
           "abstract_train_state", "create_train_state", "evaluate", "main", "make_eval_step",
           "make_train_step", "train_and_evaluate"]
