"""The soft-reset early stopper on scripted validation curves."""

from grr_train.train.early_stop import IMPROVED, RESET, STOP, WAIT, SoftResetEarlyStopper


def run(curve, **kw):
    stopper = SoftResetEarlyStopper(**kw)
    actions = []
    for step, loss in enumerate(curve):
        actions.append(stopper.update(loss, step))
        if actions[-1] == STOP:
            break
    return stopper, actions


def test_three_levels_of_three_epochs_then_stop():
    curve = [5.0, 4.0, 4.1, 4.2, 4.3, 3.9, 4.0, 4.0, 4.0, 3.95, 3.95, 3.95, 9.0]
    stopper, actions = run(curve)
    assert actions == [IMPROVED, IMPROVED, WAIT, WAIT, RESET,   # level 0 -> 1 after 3 bad epochs
                       IMPROVED, WAIT, WAIT, RESET,              # level 1 -> 2
                       WAIT, WAIT, STOP]                         # last level: stop
    assert stopper.best == 3.9 and stopper.best_step == 5
    assert stopper.level == 2 and stopper.lr_scale == 1e-4
    assert stopper.stopped


def test_flat_curve_stops_after_patience_nine():
    _, actions = run([1.0] * 20)
    assert actions.count(STOP) == 1 and len(actions) == 1 + 9
    assert actions.count(RESET) == 2


def test_equal_loss_is_not_an_improvement_and_state_round_trips():
    stopper, _ = run([2.0, 2.0])
    assert stopper.num_bad_epochs == 1
    other = SoftResetEarlyStopper()
    other.load_state_dict(stopper.state_dict())
    assert other.update(2.0, 9) == WAIT and other.update(2.0, 10) == RESET and other.lr_scale == 0.01
