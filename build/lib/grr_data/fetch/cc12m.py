"""CC12M: the published URL/caption TSV (no header; url TAB caption) fetched with img2dataset into a flat folder.

There is no source split: `grr data shard` makes the paper's random 95/5 split.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from grr_data.fetch.common import (
    WORK_DIR,
    FetchError,
    FetchOptions,
    FetchReport,
    describe_source,
    source_or_download,
)
from grr_data.fetch.img2ds import run_img2dataset, write_url_list


def read_tsv(path: Path) -> tuple[pa.Table, int]:
    """(table of url, caption; number of malformed lines skipped)."""
    bad = []

    def skip(row) -> str:
        bad.append(row.number)
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["url", "caption"], block_size=1 << 26),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=skip),
            convert_options=pacsv.ConvertOptions(column_types={"url": pa.string(), "caption": pa.string()}),
        )
    except (pa.ArrowInvalid, OSError) as err:
        raise FetchError(f"{path}: cannot read it as a url<TAB>caption list ({err})") from err
    if table.num_rows == 0:
        raise FetchError(f"{path}: no url<TAB>caption lines in it")
    return table, len(bad)


def fetch(options: FetchOptions) -> dict:
    out = Path(options.out)
    report = FetchReport("cc12m", options)
    tsv = source_or_download(options, report.manifest["sources"]["url_list"]["url"],
                             "the cc12m.tsv URL/caption list")
    source = describe_source(tsv)
    report.sources.append(source)
    table, num_bad = read_tsv(tsv)
    if num_bad:
        report.warn(f"{tsv}: {num_bad} malformed lines skipped (not url<TAB>caption)")
    columns = {"url": table.column("url"), "caption": table.column("caption")}
    url_list = write_url_list(out / WORK_DIR / "urls.parquet", columns, source_id=source["sha256"])
    report.tool = run_img2dataset(url_list, out, options, table.num_rows)
    report.add_split("all", out)
    return report.finish()
