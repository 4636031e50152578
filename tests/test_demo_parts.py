"""What `grr demo` is built from, each checked alone: the shapes set's word-level tokenizer, exact
match, the report's preface, spread over seeds, loss-weight note and early-stopping marks, and one
cosine over a run (`lr_cycle_steps`)."""

import json
from dataclasses import replace

import pytest
import sentencepiece as spm
from tiny_run import make_set, tiny_config

from grr_data.fetch.catalog import load_manifest
from grr_data.fetch.shapes import ShapesSpec
from grr_data.fetch.shapes_tokenizer import write_shapes_tokenizer
from grr_data.tokenizer import load_tokenizer
from grr_train.demo.report import exact_by_kind, mean_eval, preface, scene_kind
from grr_train.eval.caption_metrics import caption_scores, exact_match
from grr_train.eval.compare import Section, _events, write_report
from grr_train.runs.metrics import read_metrics
from grr_train.train.config import TrainConfig
from grr_train.train.schedule import lr_at
from grr_train.train.settings import resolve_config
from grr_train.train.trainer import run_training


@pytest.fixture(scope="module")
def spec():
    return ShapesSpec(load_manifest("shapes"))


def test_the_shapes_tokenizer_gives_one_piece_per_word_and_the_same_bytes(spec, tmp_path):
    first = write_shapes_tokenizer(spec, tmp_path / "a")
    second = write_shapes_tokenizer(spec, tmp_path / "b")
    assert (first / "spiece.model").read_bytes() == (second / "spiece.model").read_bytes()
    pieces = spm.SentencePieceProcessor(model_file=str(first / "spiece.model"))
    for word in sorted(spec.words()):
        assert len(pieces.encode(word, out_type=str)) == 1, word
    tok = load_tokenizer(first)
    captions = ["a small red circle to the left of a large blue cross", "three small green triangles",
                "a large yellow star above a small purple square"]
    ids, truncated, invalid = tok.encode_captions(captions)
    assert not truncated.any() and not invalid.any()
    assert [tok.decode(row) for row in ids] == captions
    assert [int((row > 0).sum()) for row in ids] == [len(c.split()) + 3 for c in captions]  # + BOS, EOS, CLS
    # other text still encodes (letters are pieces too), so a user's caption never fails
    assert tok.decode(tok.encode_batch(["a zebra 42"])[0][0]) == "a zebra 42"


def test_exact_match_counts_word_for_word_captions():
    assert exact_match(["A red circle.", "a blue square"], [["a red circle"], ["a blue circle", "x"]]) == 0.5
    assert exact_match(["a b"], [["c", "A, B"]]) == 1.0
    assert caption_scores(["a b c"], [["a b d"]])["exact_match"] == 0.0
    with pytest.raises(ValueError, match="reference sets"):
        exact_match(["a"], [])


def test_scene_kinds_and_exact_match_by_kind():
    assert scene_kind("three small green triangles") == "a count"
    assert scene_kind("a small red circle above a large blue cross") == "two objects"
    assert scene_kind("a large red circle") == "one object"
    result = {"captioning": {"captions": [
        {"generated": "a large red circle", "references": ["a large red circle"]},
        {"generated": "a large red circle", "references": ["a small red circle"]},
        {"generated": "two large red circles", "references": ["two large red circles"]},
    ]}}
    assert exact_by_kind(result) == {"one object": (1, 2), "a count": (1, 1)}


def test_mean_eval_gives_the_mean_and_the_spread_of_every_number():
    a = {"loss": 1.0, "run": "r0", "retrieval": {"i2t_r1": 10.0}, "captioning": None}
    b = {"loss": 3.0, "run": "r1", "retrieval": {"i2t_r1": 20.0}, "captioning": None}
    mean, sd = mean_eval([a, b])
    assert mean["loss"] == 2.0 and mean["retrieval"]["i2t_r1"] == 15.0 and mean["run"] == "r0"
    assert sd["loss"] == pytest.approx(2 ** 0.5) and sd["retrieval"]["i2t_r1"] == pytest.approx(50 ** 0.5)
    assert mean_eval([a]) == (a, {})


def _eval(loss, con, cap):
    return {"loss": loss, "perplexity": 2.0, "contrastive": 1.0, "contrastive_batch_size": 8, "lambda_con": con,
            "lambda_cap": cap, "retrieval": {"num_images": 4, "num_texts": 4, "i2t_r1": 50.0, "i2t_r5": 100.0,
                                             "i2t_r10": 100.0, "t2i_r1": 25.0, "t2i_r5": 100.0, "t2i_r10": 100.0},
            "captioning": {"bleu4": 0.5, "cider": 1.0, "exact_match": 0.25, "num_images": 4, "decoding": "greedy"}}


def test_report_preface_spread_and_a_note_when_loss_weights_differ(tmp_path):
    sections = [Section("Pretraining: x", _eval(3.0, 2.0, 1.0), _eval(2.0, 2.0, 1.0)),
                Section("Fine-Tuning: x", _eval(2.0, 1.0, 2.0), _eval(1.0, 1.0, 2.0),
                        spread_a={"loss": 0.5, "captioning": {"exact_match": 0.05}}, spread_b={"loss": 0.25})]
    text = preface(num_pairs=100, splits={"train": 80, "val": 10, "test": 10}, pretrain_steps=50, finetune_steps=5,
                   batch_size=8, seeds=[0, 1], minutes=1.2, grid="report/examples.png",
                   kinds={"Baseline CoCa, val (seen)": {"one object": (2, 3)}})
    paths = write_report(sections, tmp_path / "report", preface=text)
    md = (tmp_path / "report" / "comparison.md").read_text()
    assert md.startswith("# grr demo") and "chance R@1 10.0%" in md and "2 seeds (0, 1)" in md
    assert "| Baseline CoCa, val (seen) | 2/3 | - | - |" in md
    assert "![example captions](examples.png)" in md
    assert "| CoCa Loss | 2.0000 ± 0.5000 | 1.0000 ± 0.2500 | -50.00% |" in md
    assert "| Exact-match captions | 25.0% ± 5.0% | 25.0% | +0.00% |" in md
    assert "different loss weights" in md and "Fine-Tuning: x: lambda_con 1, lambda_cap 2" in md
    one_weight = write_report(sections[:1], tmp_path / "one")
    assert "different loss weights" not in (tmp_path / "one" / "comparison.md").read_text()
    assert paths["markdown"] and one_weight["markdown"]


def test_early_stopping_events_become_marks_on_the_curves():
    records = [{"kind": "event", "step": 10, "what": "early_stop_improved"},
               {"kind": "event", "step": 20, "what": "early_stop_reset"},
               {"kind": "event", "step": 30, "what": "early_stop_improved"},
               {"kind": "event", "step": 40, "what": "early_stop_stop"},
               {"kind": "event", "step": 40, "what": "stop"}, {"kind": "val", "step": 40}]
    assert _events(records) == [(20, "--"), (40, "-"), (30, ":")]  # drop, stop, the best step


def test_lr_cycle_steps_runs_one_cosine_over_the_run(tmp_path):
    with pytest.raises(ValueError, match="lr_cycle_steps must be at least 1"):
        resolve_config("pretrain", None, ["lr_cycle_steps=0"])
    assert resolve_config("pretrain", None, ["lr_cycle_steps=12"]).lr_cycle_steps == 12
    assert TrainConfig().lr_cycle_steps is None  # the paper: one cycle per epoch
    data, _ = make_set(tmp_path)
    # 8 samples, batch 4: 2 steps per epoch. With a 6-step cycle the rate must not restart at the
    # epoch ends (steps 3 and 5), as it would with the default.
    cfg = replace(tiny_config(data, steps=7), lr_cycle_steps=6, epochs=4, checkpoint_every=100)
    run_training(cfg, tmp_path / "run")
    logged = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    expected = [lr_at(s, lr_max=1e-3, lr_min=1e-4, warmup_steps=1, cycle_steps=6) for s in range(7)]
    assert logged == pytest.approx(expected)
    assert logged[1] > logged[2] > logged[3] > logged[4] > logged[5] > logged[6]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr_cycle_steps"] == 6


@pytest.mark.slow
def test_demo_with_two_seeds_reports_means_and_spreads(tmp_path):
    from grr_train.demo.run import DemoPlan, run_demo

    plan = DemoPlan(num_pairs=80, pretrain_steps=3, finetune_steps=2, batch_size=4, seeds=(0, 1))
    said = []
    paths = run_demo(tmp_path / "demo", plan, say=said.append)
    for seed in (0, 1):
        for run in ("pretrain-baseline", "finetune-baseline", "pretrain-grr", "finetune-grr"):
            assert (tmp_path / "demo" / "runs" / f"seed{seed}" / run / "checkpoints").is_dir()
    # both models of seed 1 were trained, one after another or at once (on two or more cores)
    assert any("GRR-CoCa" in line and "seed 1" in line for line in said)
    assert any("Baseline CoCa" in line and "seed 1" in line for line in said)
    md = (tmp_path / "demo" / "report" / "comparison.md").read_text()
    assert "2 seeds (0, 1)" in md and "| CoCa Loss |" in md
    loss_row = next(line for line in md.splitlines() if line.startswith("| CoCa Loss |"))
    assert loss_row.count("±") == 2  # both models: mean ± standard deviation over the seeds
    report = json.loads((tmp_path / "demo" / "report" / "comparison.json").read_text())
    assert report["sections"][0]["rows"][0]["a_sd"] > 0
    assert paths["examples"].endswith("examples.png")


def _jobs(data, root, bad_short=None, steps=2):
    from grr_train.demo.jobs import Job

    jobs = []
    for name, short in (("Baseline CoCa", "baseline"), ("GRR-CoCa", "grr")):
        cfg = replace(tiny_config(data, steps=steps if short != bad_short else 2), epochs=100000,
                      checkpoint_every=1000)
        pre, fine = root / "runs" / f"pretrain-{short}", root / "runs" / f"finetune-{short}"
        start = root / "runs" / "no-such-run" if short == bad_short else pre
        finetune = replace(cfg, recipe="finetune", init_from=str(start), max_steps=1)
        jobs.append(Job(name, short, "grr-tiny", 0, cfg, finetune, pre, fine))
    return jobs


@pytest.mark.slow
def test_demo_jobs_train_both_models_at_once_each_logging_to_its_own_file(tmp_path):
    from grr_train.demo.jobs import run_jobs

    data, _ = make_set(tmp_path)
    said = []
    run_jobs(_jobs(data, tmp_path), parallel=True, say=said.append)
    assert len(said) == 1 and "at once" in said[0]
    for short in ("baseline", "grr"):
        pre = read_metrics(tmp_path / "runs" / f"pretrain-{short}" / "metrics.jsonl", "train")
        fine = read_metrics(tmp_path / "runs" / f"finetune-{short}" / "metrics.jsonl", "train")
        assert [r["step"] for r in pre] == [1, 2] and [r["step"] for r in fine] == [1]
        log = (tmp_path / "runs" / f"{short}.log").read_text()
        assert "3/5 pretrain" in log and "4/5 fine-tune" in log  # each process's output went to its log


@pytest.mark.slow
def test_a_failing_demo_job_names_its_log_and_stops_the_other_one_with_a_checkpoint(tmp_path):
    from grr_train.demo.jobs import run_jobs

    data, _ = make_set(tmp_path)
    # The baseline pretrains, then cannot find the run to fine-tune from; GRR would train for
    # 100000 steps if nothing stopped it.
    jobs = _jobs(data, tmp_path, bad_short="baseline", steps=100000)
    with pytest.raises(RuntimeError, match=r"training Baseline CoCa failed: .*no-such-run.*baseline\.log"):
        run_jobs(jobs, parallel=True, say=lambda _: None)
    events = read_metrics(tmp_path / "runs" / "pretrain-grr" / "metrics.jsonl", "event")
    assert any(e["what"] == "stop" and e["reason"] == "signal" for e in events)
    assert (tmp_path / "runs" / "pretrain-grr" / "checkpoints" / "latest").exists()
    assert "Traceback" in (tmp_path / "runs" / "baseline.log").read_text()  # the details stay in its log


def test_the_demo_settings_run_eagerly_on_a_gpu_too():
    # trim_text_padding is refused where compile=auto would compile (CUDA); the demo asks for eager.
    import torch

    from grr_train.demo.run import FULL, _finetune_settings, _pretrain_settings
    from grr_train.train.setup import compile_mode

    for settings in (_pretrain_settings(FULL, 0, 200), _finetune_settings(FULL, 0, 200)):
        cfg = resolve_config("pretrain", None, settings)
        assert cfg.trim_text_padding
        assert compile_mode(cfg, torch.device("cuda")) == "off"
