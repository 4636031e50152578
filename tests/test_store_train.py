"""Training and evaluation with `--data s3://...` (issue 23), against moto in server mode behind a
fault proxy (tests/s3_server.py): the same losses as from the set on disk, exact resume, the same
evaluation, no credential in anything a run writes, and a store that goes down mid-run: the run
stops with a clear error after saving its last whole step, and resumes exactly once the store is
back."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import ACCESS_KEY, SECRET_KEY, new_bucket, upload  # noqa: E402
from test_train import make_data, tiny, train_losses  # noqa: E402

from grr_data.infra.store import StoreError  # noqa: E402
from grr_train.eval.evaluate import evaluate_run  # noqa: E402
from grr_train.runs.checkpoint import latest_checkpoint, read_meta  # noqa: E402
from grr_train.train.settings import resume_config  # noqa: E402
from grr_train.train.trainer import Trainer, run_training  # noqa: E402


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), (6, 6), (4,))


@pytest.fixture(scope="module")
def local_run(local_data, tmp_path_factory):
    """The reference: 6 steps (2 epochs of 3, validation between) on the set on disk."""
    run = tmp_path_factory.mktemp("local") / "run"
    assert run_training(tiny(local_data, dropout=0.15), run)["step"] == 6
    return run


@pytest.mark.slow
def test_training_from_the_store_resumes_and_evaluates_as_from_disk(env, local_data, local_run, tmp_path):
    url = upload(env, local_data, f"s3://{new_bucket(env)}/sets/train")
    run = tmp_path / "run"
    cfg = tiny(url, dropout=0.15)
    run_training(replace(cfg, max_steps=4), run)  # stops inside the second epoch
    resumed = run_training(resume_config(run, max_steps=6), run, resume=True)
    assert resumed["step"] == 6 and resumed["samples_skipped"] == {}
    assert train_losses(run) == train_losses(local_run)  # exact
    kw = dict(split="val", batch_size=2, contrastive_batch_size=2, device="cpu", loader_kind="cpu", num_workers=0)
    from_store, from_disk = evaluate_run(run, url, **kw), evaluate_run(local_run, local_data, **kw)
    assert {k: v for k, v in from_store.items() if isinstance(v, float)} == \
        {k: v for k, v in from_disk.items() if isinstance(v, float)}
    # the run records the set's URL, never a credential
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, path
    assert url in (run / "config.json").read_text()


@pytest.mark.slow
def test_a_store_down_mid_run_saves_the_last_step_and_the_run_resumes_exactly(env, local_data, local_run, tmp_path,
                                                                               monkeypatch):
    url = upload(env, local_data, f"s3://{new_bucket(env)}/sets/down")
    monkeypatch.setenv("GRR_STORE_RETRY_S", "2")
    log_train = Trainer._log_train

    def down_after_step_two(self, metrics, seconds):
        log_train(self, metrics, seconds)
        if self.state.step == 2:
            env.proxy.down()

    monkeypatch.setattr(Trainer, "_log_train", down_after_step_two)
    run = tmp_path / "run"
    cfg = replace(tiny(url, dropout=0.15), checkpoint_every=1000)  # no periodic save would cover it
    with pytest.raises(StoreError) as caught:
        run_training(cfg, run)
    message = str(caught.value)
    assert f"the store at {env.proxy.url}" in message and "did not answer for 2 s" in message
    saved = read_meta(latest_checkpoint(run))["step"]
    assert saved >= 2 and f"step {saved} is saved: rerun with --resume" in message
    assert [s for s, _ in train_losses(run)] == list(range(1, saved + 1))
    monkeypatch.setattr(Trainer, "_log_train", log_train)
    env.proxy.up()
    resumed = run_training(resume_config(run, max_steps=6), run, resume=True)
    assert resumed["step"] == 6
    assert train_losses(run) == train_losses(local_run)  # the failed step was read again, nothing skipped
