"""A data store that fails on one process of several (grr_train/train/store_guard.py): every process
learns of it at the same point, all save the last whole step together and stop with the error, and
`--resume` continues exactly.

- The agreement itself, on 2 gloo processes (spawned, no torchrun): a step's reads failing on one
  rank raise the same StoreError, naming that rank, on both, at the same step; the others' reads of
  that step are not handed out; validation batches likewise; with no failure nothing changes.
- End to end against moto behind fault proxies (tests/s3_server.py), 2 processes of the real
  `run_training` (env:// rendezvous, as torchrun's): each rank reaches the store through a proxy
  of its own, and only rank 1's goes down, mid-epoch (a train step's reads fail) or when the first
  validation starts (a validation batch's reads fail). Both processes end well inside the
  process-group timeout (set short, so a hang fails fast) with the message, the checkpoint is of
  the last whole step, and the resumed run logs the records of an unbroken one exactly.
- The example captions, which only the main process reads (for TensorBoard and W&B): a store that
  fails while they are read makes them unavailable (said once), not an error on one rank alone.
"""

import json
import os
import shutil
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import Proxy, free_port, new_bucket, upload  # noqa: E402
from test_train import make_data, tiny  # noqa: E402

from grr_data.format.manifest import Manifest  # noqa: E402
from grr_data.infra.store import StoreError, StoreUnavailable, location  # noqa: E402
from grr_data.tokenizer import SAMPLE_TOKENIZER_DIR  # noqa: E402
from grr_train.runs.checkpoint import latest_checkpoint, read_meta  # noqa: E402
from grr_train.runs.metrics import read_metrics  # noqa: E402
from grr_train.runtime.distributed import DistInfo, cpu_group  # noqa: E402
from grr_train.train.examples import ExampleCaptions  # noqa: E402
from grr_train.train.settings import resume_config  # noqa: E402
from grr_train.train.store_guard import StoreGuard  # noqa: E402
from grr_train.train.trainer import Trainer, run_training  # noqa: E402

PG_TIMEOUT_MINUTES = 1.0  # a hang in a collective fails the run after this, not torch's 10 or 30 minutes
UNAVAILABLE = "s3://b/sets/x/train-000001.tar: the store at http://127.0.0.1:1 did not answer for 2 s"
REFUSED = "s3://b/sets/x/train-000000.tar: access denied by http://127.0.0.1:0"


def spawn_two(target, args: tuple, timeout: float) -> list[dict]:
    """Run `target(rank, *args, out)` in 2 spawned processes; each writes its result as JSON to `out`."""
    ctx = mp.get_context("spawn")
    outs = [Path(args[-1]) / f"rank{rank}.json" for rank in (0, 1)]
    procs = [ctx.Process(target=target, args=(rank, *args[:-1], str(outs[rank]))) for rank in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} process(es) still running after {timeout} s"
    assert all(o.exists() for o in outs), [p.exitcode for p in procs]
    return [json.loads(o.read_text()) for o in outs]


# ---- the agreement ---------------------------------------------------------------------------------


def _agreement_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    guard = StoreGuard(cpu_group(0.25))  # 15 s: an agreement that never comes fails the worker fast
    result = {}

    def steps(fail: dict[int, str]) -> dict:
        """Read 4 steps; `fail`: {step: error} raised by this rank's reads at that step."""
        got = []
        for k in range(4):
            def read(k=k):
                if k in fail:
                    time.sleep(0.2)  # the other rank is already waiting in the agreement
                    raise (StoreError if fail[k] == REFUSED else StoreUnavailable)(fail[k])
                return 10 * rank + k
            try:
                got.append(guard.read(read))
            except StoreError as err:
                return {"got": got, "at": k, "type": type(err).__name__, "error": str(err)}
        return {"got": got}

    def validation(batches: list[str], fail_at: int | None) -> dict:
        def loader():
            for i, b in enumerate(batches):
                if i == fail_at:
                    raise StoreUnavailable(UNAVAILABLE)
                yield b
        got = []
        try:
            for batch in guard.batches(loader()):
                got.append(batch)
        except StoreError as err:
            return {"got": got, "error": str(err)}
        return {"got": got}

    try:
        result["one_fails"] = steps({2: UNAVAILABLE} if rank == 1 else {})
        result["both_fail"] = steps({1: REFUSED} if rank == 0 else {1: UNAVAILABLE})
        result["none_fails"] = steps({})
        result["validation"] = validation(["a", "b", "c"], 1 if rank == 1 else None)
        result["validation_whole"] = validation([f"{rank}a", f"{rank}b"], None)
    except Exception as err:  # noqa: BLE001 - a timeout in the agreement: reported to the test
        result["crash"] = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()
        Path(out).write_text(json.dumps(result))


# quick tier: 2 spawned processes, 3 s on the idle dev CPU (8-10 s while other jobs ran)
def test_a_store_failure_on_one_rank_is_raised_on_every_rank_at_the_same_step(tmp_path):
    r0, r1 = spawn_two(_agreement_worker, (str(tmp_path / "init"), str(tmp_path)), timeout=120)
    assert "crash" not in r0 and "crash" not in r1, (r0, r1)
    # rank 1's reads of step 2 failed: both raise there, with rank 1's error; rank 0's step 2 is not handed out
    assert r0["one_fails"] == {"got": [0, 1], "at": 2, "type": "StoreUnavailable", "error": f"rank 1: {UNAVAILABLE}"}
    assert r1["one_fails"] == {"got": [10, 11], "at": 2, "type": "StoreUnavailable", "error": f"rank 1: {UNAVAILABLE}"}
    # both failed: the first rank's error, as it was (refused, not unavailable), and both ranks named
    for r in (r0, r1):
        assert r["both_fail"]["at"] == 1 and r["both_fail"]["type"] == "StoreError"
        assert r["both_fail"]["error"] == f"rank 0: {REFUSED} (ranks 0, 1 failed)"
    assert r0["none_fails"] == {"got": [0, 1, 2, 3]} and r1["none_fails"] == {"got": [10, 11, 12, 13]}
    # validation: rank 1's second batch failed; rank 0 stops there too, after its first batch
    assert r0["validation"] == {"got": ["a"], "error": f"rank 1: {UNAVAILABLE}"}
    assert r1["validation"] == {"got": ["a"], "error": f"rank 1: {UNAVAILABLE}"}
    assert r0["validation_whole"] == {"got": ["0a", "0b"]} and r1["validation_whole"] == {"got": ["1a", "1b"]}


def test_a_local_set_or_one_process_reads_straight_through(tmp_path):
    # no group, no collective (none is initialised here): the error is the loader's own, unchanged
    err = StoreUnavailable(UNAVAILABLE)

    def read():
        raise err

    for data, world_size in ((tmp_path, 2), (location("s3://bucket/sets/x"), 1)):
        guard = StoreGuard.for_run(data, DistInfo(0, 0, world_size, torch.device("cpu")))
        assert not guard.active
        with pytest.raises(StoreUnavailable) as caught:
            guard.read(read)
        assert caught.value is err
        loader = [1, 2]
        assert guard.batches(loader) is loader


# ---- end to end ----------------------------------------------------------------------------------


def _training_worker(rank: int, port: int, moto_port: int, environ: dict, cfg, run: str, resume: bool,
                     failure: str | None, out: str) -> None:
    os.environ.update(environ)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    proxy = Proxy(moto_port)  # this rank's own way to the store: one rank's can fail alone
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    down = {}
    if rank == 1 and failure == "train":  # mid-epoch: the reads of step 5 or 6 fail (2 micro-batches a step)
        log_train = Trainer._log_train

        def down_after_step_four(self, metrics, seconds):
            log_train(self, metrics, seconds)
            if self.state.step == 4:
                proxy.down()
                down["time"] = time.time()

        Trainer._log_train = down_after_step_four
    elif rank == 1 and failure == "val":  # the first validation (epoch 0's end, step 3)
        run_validation = Trainer.run_validation

        def down_before_validation(self):
            proxy.down()
            down.setdefault("time", time.time())
            return run_validation(self)

        Trainer.run_validation = down_before_validation
    result = {"endpoint": proxy.url}
    try:
        result["summary"] = run_training(cfg, run, resume=resume)
    except Exception as err:  # noqa: BLE001 - reported to the test, which checks what it was
        result["type"], result["error"] = type(err).__name__, str(err)
    result["end"], result["down"] = time.time(), down.get("time")
    proxy.close()
    Path(out).write_text(json.dumps(result, default=str))


def train_two(s3, cfg, run: Path, tmp: Path, resume: bool = False, failure: str | None = None,
              retry_s: int = 20) -> list[dict]:
    environ = {**s3.environ(), "GRR_CACHE_DIR": str(tmp / "node-cache"), "GRR_STORE_RETRY_S": str(retry_s)}
    out = tmp / f"results-{run.name}-{int(resume)}"
    out.mkdir(parents=True)
    return spawn_two(_training_worker, (free_port(), s3.moto_port, environ, cfg, str(run), resume, failure, str(out)),
                     timeout=400)


def records(run: Path) -> list[dict]:
    """The run's train and val records without what depends on the clock."""
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s", "mfu")}
            for r in read_metrics(run) if r["kind"] in ("train", "val")]


@pytest.fixture(scope="module")
def store_set(s3, tmp_path_factory):
    data = make_data(tmp_path_factory.mktemp("data"), (6, 6), (4,))
    return upload(s3, data, f"s3://{new_bucket(s3)}/sets/ddp")


def two_process_config(url: str, parallelism: str):
    # 2 micro-batches of 1 per rank and step (accumulation), 3 steps an epoch, validation at each
    # epoch's end in 2 batches per rank; dropout on: the resume must restore every rank's RNG
    return replace(tiny(url, dropout=0.15, per_device_batch_size=1, val_batch_size=1, parallelism=parallelism),
                   checkpoint_every=1000, process_group_timeout_minutes=PG_TIMEOUT_MINUTES)


@pytest.fixture(scope="module")
def unbroken(s3, store_set, tmp_path_factory):
    """The unbroken run of each parallelism, made once when a test first asks for it."""
    runs = {}

    def get(parallelism: str) -> Path:
        if parallelism not in runs:
            tmp = tmp_path_factory.mktemp(f"unbroken-{parallelism}")
            results = train_two(s3, two_process_config(store_set, parallelism), tmp / "run", tmp)
            assert [r.get("summary", {}).get("step") for r in results] == [6, 6], results
            runs[parallelism] = tmp / "run"
        return runs[parallelism]

    return get


@pytest.mark.slow
# a train step's reads under DDP; a validation batch's under FSDP2, whose sharded save needs every rank
@pytest.mark.parametrize("failure,parallelism", [("train", "ddp"), ("val", "fsdp")])
def test_a_store_down_for_one_rank_saves_the_last_step_on_all_and_resumes_exactly(s3, store_set, unbroken, tmp_path,
                                                                                  failure, parallelism):
    run = tmp_path / "run"
    results = train_two(s3, two_process_config(store_set, parallelism), run, tmp_path, failure=failure, retry_s=2)
    down, endpoint = results[1]["down"], results[1]["endpoint"]
    for r in results:
        assert r.get("type") == "StoreError", r
    meta = read_meta(latest_checkpoint(run))
    saved = meta["step"]
    assert meta.get("sharded", False) == (parallelism == "fsdp")  # FSDP2: saved by both ranks, sharded
    for r in results:
        assert r["error"].startswith(f"rank 1: s3://{store_set.removeprefix('s3://')}/"), r["error"]
        assert f"the store at {endpoint} " in r["error"] and "did not answer for 2 s" in r["error"]
        assert r["error"].endswith(f"; step {saved} is saved: rerun with --resume once the store answers")
        assert r["end"] - down < 0.5 * PG_TIMEOUT_MINUTES * 60, (r["end"] - down, r)  # not a collective's timeout
    # the last whole step: mid-epoch 1 after step 4 (read-ahead may have fetched step 5's samples),
    # or epoch 0's end with its validation still to do
    assert saved in ((4, 5) if failure == "train" else (3,))
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, saved + 1))
    assert [r["step"] for r in read_metrics(run, "val")] == ([3] if failure == "train" else [])
    assert [e["step"] for e in read_metrics(run, "event") if e["what"] == "store_failure"] == [saved]  # once

    resumed = train_two(s3, resume_config(run), run, tmp_path, resume=True)
    assert [r.get("summary", {}).get("step") for r in resumed] == [6, 6], resumed
    assert records(run) == records(unbroken(parallelism))


def test_example_captions_from_a_store_that_fails_are_given_up_not_raised(env, store_set, tmp_path, monkeypatch):
    monkeypatch.setenv("GRR_STORE_RETRY_S", "1")
    run = tmp_path / "run"
    shutil.copytree(SAMPLE_TOKENIZER_DIR, run / "tokenizer")  # a run's tokenizer copy: examples can be made
    examples = ExampleCaptions(run, Manifest.read(store_set), "val", torch.device("cpu"), None)
    env.proxy.down()
    assert examples.rows(model=None) == []  # the model is not reached: nothing to caption
    assert examples.unavailable.startswith("the 'val' samples could not be read (s3://")
    assert "did not answer for 1 s" in examples.unavailable
