"""Early stopping on the validation CoCa loss with the paper's soft reset (section 3.6).

The exact rule (the paper gives patience 9 = 3 learning-rate levels x 3 epochs):

1. After each end-of-epoch validation, a loss strictly below the best so far is an
   improvement: it becomes the best, the trainer saves the model and optimizer as `best/`,
   and the count of epochs without improvement goes back to 0.
2. Otherwise the count goes up by 1. When it reaches `patience_per_level` (3):
   - if this is not the last level (`num_lr_levels`, 3), the trainer reloads `best/`
     (model and optimizer), both learning-rate bounds are divided by `lr_reduction` (100)
     once more, the count goes back to 0 and training goes on from the best state;
   - on the last level, training stops.

So a run stops after 3 levels x 3 epochs = 9 epochs without improvement in all (the
patience of 9), at learning-rate scales 1, 1/100 and 1/10,000. Improvements never raise the
level again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

IMPROVED, WAIT, RESET, STOP = "improved", "wait", "reset", "stop"


@dataclass
class SoftResetEarlyStopper:
    patience_per_level: int = 3
    num_lr_levels: int = 3
    lr_reduction: float = 100.0
    best: float = float("inf")
    best_step: int = -1
    num_bad_epochs: int = 0
    level: int = 0
    stopped: bool = False

    @property
    def lr_scale(self) -> float:
        """What both learning-rate bounds are multiplied by at the current level."""
        return self.lr_reduction ** -self.level

    def update(self, loss: float, step: int) -> str:
        """Record one end-of-epoch validation loss; returns improved, wait, reset or stop."""
        if self.stopped:
            raise RuntimeError("the early stopper has already stopped the run")
        if loss < self.best:
            self.best, self.best_step, self.num_bad_epochs = loss, step, 0
            return IMPROVED
        self.num_bad_epochs += 1
        if self.num_bad_epochs < self.patience_per_level:
            return WAIT
        if self.level + 1 < self.num_lr_levels:
            self.level += 1
            self.num_bad_epochs = 0
            return RESET
        self.stopped = True
        return STOP

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
