"""`grr data fetch cc12m --retry-failed` against a stand-in served on 127.0.0.1: the failed URLs of a
finished fetch are fetched again and added as new shards, and the counts stay per URL."""

import json
import shutil

import pytest
from fetch_helpers import no_worker_pool, read_split  # noqa: F401  (no_worker_pool: a fixture)
from PIL import Image

from grr_data.fetch import FetchError, FetchOptions, fetch
from grr_data.fetch.loopback import serve_directory


def _options(out, tsv, **kw):
    return FetchOptions(out=out, source=tsv, workers=1, threads=2, retries=0, shard_size=2, **kw)


@pytest.mark.slow  # four img2dataset runs (~3 s each here)
@pytest.mark.usefixtures("no_worker_pool")
def test_retry_failed_fetches_the_failed_urls_again(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    for name in ("img0.jpg", "img1.jpg"):
        Image.new("RGB", (400, 300), (90, 30, 30)).save(www / name)
    (www / "page.jpg").write_text("<html>not a picture</html>")
    with serve_directory(www) as base:
        tsv = tmp_path / "cc12m.tsv"
        tsv.write_text(f"{base}/img0.jpg\tfirst\n{base}/late.jpg\tlate\n{base}/page.jpg\tpage\n{base}/img1.jpg\tlast\n")
        out = tmp_path / "out"
        first = fetch("cc12m", _options(out, tsv))["splits"]["all"]
        assert (first["num_samples"], first["num_attempted"]) == (2, 4)
        assert first["failures"] == {"http_404": 1, "not_an_image": 1}

        Image.new("RGB", (300, 600), (30, 90, 30)).save(www / "late.jpg")  # the server has it now
        data = fetch("cc12m", _options(out, tsv, retry_failed=True))
        split = data["splits"]["all"]
        assert (split["num_samples"], split["num_attempted"], split["num_shards"]) == (3, 4, 3)
        assert split["failures"] == {"not_an_image": 1}
        assert data["retries"][0]["retried"] == 2 and data["retries"][0]["recovered"] == 1
        assert data["retries"][0]["first_shard"] == "00002"
        samples = read_split(out)
        assert sorted(m["caption"] for m in samples) == ["first", "last", "late"]
        late = next(m for m in samples if m["caption"] == "late")
        assert late["size"] == (288, 576) and late["retry_of"]
        assert len({m["key"] for m in samples}) == 3  # the new shard's keys are its own
        assert json.loads((out / "fetch_manifest.json").read_text())["splits"]["all"] == split
        assert not (out / "_work" / "retry-1").exists()

        # a second pass retries only what is still failed (the page), and a fixed one is recovered
        shutil.copy(www / "img0.jpg", www / "page.jpg")
        again = fetch("cc12m", _options(out, tsv, retry_failed=True))
        assert [p["retried"] for p in again["retries"]] == [2, 1] and again["retries"][1]["recovered"] == 1
        assert again["splits"]["all"]["num_samples"] == 4 and again["splits"]["all"]["failures"] == {}
        assert again["splits"]["all"]["num_attempted"] == 4
        done = fetch("cc12m", _options(out, tsv, retry_failed=True))
        assert "--retry-failed: no failed downloads left to retry" in done["warnings"]
        assert len(done["retries"]) == 2
        assert sorted(m["caption"] for m in read_split(out)) == ["first", "last", "late", "page"]


def test_retry_failed_needs_a_finished_cc12m_fetch(tmp_path):
    with pytest.raises(FetchError, match="no finished fetch there .*run the fetch without --retry-failed first"):
        fetch("cc12m", FetchOptions(out=tmp_path / "none", retry_failed=True))
    with pytest.raises(FetchError, match="--retry-failed works on cc12m .*mscoco .*fetch it again into a new"):
        fetch("mscoco", FetchOptions(out=tmp_path / "m", retry_failed=True))
