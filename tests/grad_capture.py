"""The gradients a step hands its optimizer, captured for tests that compare steps."""

from contextlib import contextmanager


@contextmanager
def captured_grads(model):
    """Yields a dict that fills with each parameter's gradient (a copy) as the optimizer receives it:
    each hook fires after a micro-batch's backward has accumulated into .grad, so the last capture is
    the step's whole gradient, before clipping or the update change anything in place."""
    captured = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: captured.__setitem__(n, p.grad.clone()))
             for n, p in model.named_parameters()]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()
