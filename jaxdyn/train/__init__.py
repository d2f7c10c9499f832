"""The trainer: `python -m jaxdyn.train --config configs/<exp>.py[:preset] --workdir DIR`.

One loop (`loop.train_and_evaluate`), one step (`step.make_train_step`), one optimizer
builder (`optim.make_optimizer`) and pluggable objectives (`objectives`: `lm`, `mtp`,
`temporal`). A workdir is safe (`workdir`): one trainer and one model per workdir.
"""

from jaxdyn.train.init import CheckpointMismatchError
from jaxdyn.train.loop import NonFiniteLossError, train_and_evaluate
from jaxdyn.train.objectives import OBJECTIVES, make_objective
from jaxdyn.train.state import TrainState, abstract_train_state, create_train_state
from jaxdyn.train.step import evaluate, make_eval_step, make_train_step
from jaxdyn.train.workdir import (
    ObjectStorePathError,
    UnsafeWorkdirPathError,
    WorkdirError,
    WorkdirLockedError,
)

__all__ = ["OBJECTIVES", "CheckpointMismatchError", "NonFiniteLossError",
           "ObjectStorePathError", "TrainState", "UnsafeWorkdirPathError", "WorkdirError",
           "WorkdirLockedError", "abstract_train_state", "create_train_state", "evaluate",
           "make_eval_step", "make_objective", "make_train_step", "train_and_evaluate"]
