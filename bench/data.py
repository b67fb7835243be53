"""The data step on a large synthetic file, as a ratio against reading it, both measured in this run:

* rows/s of reading a ShareGPT JSON-lines file (`read_rows`: one `json.loads` per line, the floor of any data step);
* rows/s of `build_dataset` on the same file (each row mapped through the field mapping, validated, deduplicated,
  split, saved), and the ratio of the two;
* seconds of `loraflow new`'s inspection (the first 5,000 rows, shape and field mapping).

The file mixes what people have: plain conversations, function calls with their results and a `tools` column, 1%
exact duplicates and 1% rows with an unknown role.

    .venv/bin/python bench/data.py [--rows 50000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLS = json.dumps([{"name": "local_time", "description": "현지 시각",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])


def synthetic_row(index: int) -> dict[str, Any]:
    if index % 100 == 1:
        return synthetic_row(index - 1)  # an exact duplicate
    if index % 100 == 2:
        return {"conversations": [{"from": "narrator", "value": "?"}, {"from": "gpt", "value": "!"}]}
    if index % 5 == 0:
        return {"conversations": [
            {"from": "human", "value": f"도시 {index}의 시각은?"},
            {"from": "function_call", "value": json.dumps({"name": "local_time", "arguments": {"city": str(index)}})},
            {"from": "observation", "value": "오후 3시"},
            {"from": "gpt", "value": f"도시 {index}는 지금 오후 3시입니다."}], "tools": TOOLS}
    return {"conversations": [{"from": "system", "value": "친절한 도우미"},
                              {"from": "human", "value": f"질문 {index}: 헌법 제{index % 130}조는 무엇을 정합니까?"},
                              {"from": "gpt", "value": f"답 {index}: 제{index % 130}조는 " + "국민의 권리를 " * 8},
                              {"from": "human", "value": "더 자세히 알려 주세요."},
                              {"from": "gpt", "value": "자세한 내용은 " + "법률로 정합니다. " * 6}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()

    from loraflow.config.data import DataConfig
    from loraflow.data.build_dataset import build_dataset
    from loraflow.data.load import read_rows
    from loraflow.data.shapes import inspect_data
    from loraflow.data.sources import pin_data

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "sharegpt.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for index in range(args.rows):
                fh.write(json.dumps(synthetic_row(index), ensure_ascii=False) + "\n")
        data = DataConfig(sources=[{"path": str(path), "fields": {"messages": "conversations", "role_key": "from",
                                                                  "content_key": "value"}}])
        pinned = pin_data(data)
        started = time.perf_counter()
        read = sum(1 for _ in read_rows(pinned.data.sources[0], pinned.fingerprints[0]))
        read_s = time.perf_counter() - started
        out = Path(scratch) / "out"
        out.mkdir()
        started = time.perf_counter()
        result = build_dataset(pinned, out, "bench")
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        inspection = inspect_data(str(path))
        inspect_s = time.perf_counter() - started
    figures = {
        "data.rows": read,
        "data.read_rows_per_s": read / read_s,
        "data.build_rows_per_s": read / build_s,
        "data.build_vs_read": read_s / build_s,
        "data.kept": result.stats["train_rows"] + result.stats["eval_rows"],
        "data.duplicates": result.stats["duplicates"],
        "data.rejected": result.stats["rejected_rows"],
        "data.new_inspect_s": inspect_s,
        "data.new_shape": inspection.shape,
    }
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
