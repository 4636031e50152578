"""The Table 2 report from two tiny runs' metrics.jsonl and eval results written here."""

import json

import pytest

from grr_train.eval.compare import Section, percent_change, write_report
from grr_train.runs.metrics import read_metrics


def _run(tmp_path, name, scale):
    run = tmp_path / name
    run.mkdir()
    lines = [{"kind": "train", "step": s, "epoch": 0, "loss": scale * (5 - 0.1 * s), "contrastive": 1.0,
              "caption": 2.0, "lr": 1e-4, "grad_norm": 1.0, "samples_per_s": 10.0, "time": s} for s in range(1, 31)]
    lines += [{"kind": "val", "step": s, "epoch": 0, "split": "val", "loss": scale * (4 - 0.05 * s),
               "contrastive": scale * 1.5, "caption": 2.0, "perplexity": scale * 9.0,
               "contrastive_batch_size": 8, "num_samples": 16} for s in (10, 20, 30)]
    lines.append({"kind": "event", "step": 30, "what": "stop"})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(run)


def _eval(run, scale):
    return {
        "run": run, "checkpoint_step": 30, "data": "shards", "split": "val", "num_samples": 16,
        "batch_size": 8, "contrastive_batch_size": 8,
        "loss": 3.0 * scale, "perplexity": 12.0 * scale, "contrastive": 0.5 * scale, "caption": 2.0,
        "retrieval": {"num_images": 4, "num_texts": 16, "i2t_r1": 25.0 / scale, "i2t_r5": 100.0,
                      "i2t_r10": 100.0, "t2i_r1": 25.0, "t2i_r5": 100.0, "t2i_r10": 100.0},
        "captioning": {"bleu4": 0.1 / scale, "cider": 0.2 / scale, "exact_match": 0.5, "num_images": 4,
                       "decoding": "greedy"},
    }


def test_report_has_every_row_and_the_plots(tmp_path):
    run_a, run_b = _run(tmp_path, "baseline", 1.0), _run(tmp_path, "grr", 0.9)
    sections = [Section("Fine-Tuning: sample val", _eval(run_a, 1.0), _eval(run_b, 0.9), run_a, run_b)]
    paths = write_report(sections, tmp_path / "report")

    md = (tmp_path / "report" / "comparison.md").read_text()
    # The paper's Table 2 rows, values worked out by hand from _eval: B = A x 0.9 for the losses and
    # perplexity, A / 0.9 for image-to-text R@1, BLEU-4 and CIDEr-D (+11.11%), the rest equal.
    assert md.splitlines()[:15] == [
        "| Metric | Baseline CoCa | GRR-CoCa | % Change |",
        "|---|---:|---:|---:|",
        "| **Fine-Tuning: sample val** | | | |",
        "| CoCa Loss | 3.0000 | 2.7000 | -10.00% |",
        "| Perplexity | 12.0000 | 10.8000 | -10.00% |",
        "| Contrastive Loss (batch 8) | 0.5000 | 0.4500 | -10.00% |",
        "| Image-to-text R@1 (%) | 25.00 | 27.78 | +11.11% |",
        "| Image-to-text R@5 (%) | 100.00 | 100.00 | +0.00% |",
        "| Image-to-text R@10 (%) | 100.00 | 100.00 | +0.00% |",
        "| Text-to-image R@1 (%) | 25.00 | 25.00 | +0.00% |",
        "| Text-to-image R@5 (%) | 100.00 | 100.00 | +0.00% |",
        "| Text-to-image R@10 (%) | 100.00 | 100.00 | +0.00% |",
        "| BLEU-4 | 0.1000 | 0.1111 | +11.11% |",
        "| CIDEr-D | 0.2000 | 0.2222 | +11.11% |",
        "| Exact-match captions | 50.0% | 50.0% | +0.00% |",
    ]

    report = json.loads((tmp_path / "report" / "comparison.json").read_text())
    rows = report["sections"][0]["rows"]
    assert [r["metric"] for r in rows] == [line.split(" | ")[0][2:] for line in md.splitlines()[3:15]]
    assert rows[1] == {"metric": "Perplexity", "a": 12.0, "b": pytest.approx(10.8),
                       "change_pct": pytest.approx(-10.0)}
    cider = next(r for r in rows if r["metric"] == "CIDEr-D")
    assert cider["change_pct"] == pytest.approx(100 * (0.2 / 0.9 - 0.2) / 0.2)
    assert rows[-1] == {"metric": "Exact-match captions", "a": 0.5, "b": 0.5, "change_pct": 0.0}
    assert report["sections"][0]["eval_b"]["checkpoint_step"] == 30

    for key in ("curves-fine-tuning-sample-val", "recall-fine-tuning-sample-val"):
        png = paths[key]
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "report").glob("*.tmp*"))


def test_missing_rows_are_marked_not_invented(tmp_path):
    a = {"loss": 1.0, "perplexity": 2.0, "contrastive": 0.0, "contrastive_batch_size": 4}
    b = {"loss": 0.5, "perplexity": 2.0, "contrastive": 0.1, "contrastive_batch_size": 4}
    paths = write_report([Section("Pretraining: x", a, b)], tmp_path)
    md = (tmp_path / "comparison.md").read_text()
    assert "| BLEU-4 | n/a | n/a | n/a |" in md
    assert "| Contrastive Loss (batch 4) | 0.0000 | 0.1000 | n/a |" in md  # change from 0 undefined
    assert set(paths) == {"markdown", "json"}  # no logs and no recall: no plots


def test_percent_change():
    assert percent_change(2.0, 1.0) == -50.0
    assert percent_change(0.0, 1.0) is None
    assert percent_change(None, 1.0) is None


def test_bad_metrics_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)
