import json
from pathlib import Path

import pandas as pd
import pytest
from datasets import load_from_disk

from loraflow.config.data import DataConfig
from loraflow.data.build_dataset import DatasetError, build_dataset
from loraflow.data.keys import dataset_key


def _write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _build(tmp_path: Path, **data) -> tuple:
    config = DataConfig.model_validate(data)
    out = tmp_path / "out"
    out.mkdir()
    result = build_dataset(config, out, dataset_key(config))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return result, rejected, load_from_disk(result.dataset_dir)


def test_bad_rows_are_rejected_with_reasons_and_good_rows_survive(tmp_path: Path):
    good = [_chat(f"질문 {i}", f"답변 {i}") for i in range(20)]
    bad = [
        _chat("질문", "   "),
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "끝나지 않은 대화"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        _chat("긴 질문", "가" * 300),
        "{not json",
        {"text": "no messages field"},
        good[0],
    ]
    source = _write_jsonl(tmp_path / "mixed.jsonl", good[:10] + bad + good[10:])
    result, rejected, splits = _build(
        tmp_path, sources=[{"path": str(source)}], max_chars_per_turn=200, eval_fraction=0.2
    )
    reasons = {r["row"]: r["reason"] for r in rejected}
    assert reasons == {
        11: "turn 1: empty assistant turn",
        12: "turn 0: unknown role 'robot' (known: system, user, assistant, tool, human, gpt, function_call, "
            "observation; fields.roles maps more)",
        13: "conversation does not end with an assistant turn",
        14: "turn 0: expected user, found assistant (after an optional system turn: user, assistant, user, ...; "
            "tool results after an assistant's tool call)",
        15: "turn 1: 300 chars > max_chars_per_turn 200",
        16: reasons[16],
        17: "missing field 'messages'",
        18: "exact duplicate of an earlier row",
    }
    assert reasons[16].startswith("invalid JSON")
    assert all(r["source"] == str(source) for r in rejected)
    assert len(splits["train"]) + len(splits["eval"]) == 20
    assert result.stats["rejected_rows"] == 8 and len(splits["eval"]) >= 1


def test_csv_and_parquet_sources_with_field_mapping_and_system_prompt(tmp_path: Path):
    frame = pd.DataFrame(
        {"instruction": [f"지시 {i}" for i in range(8)], "output": [f"출력 {i}" for i in range(8)]}
    )
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.assign(instruction=frame.instruction + "!").to_parquet(tmp_path / "b.parquet")
    fields = {"prompt": "instruction", "response": "output"}
    _, rejected, splits = _build(
        tmp_path,
        sources=[
            {"path": str(tmp_path / "a.csv"), "fields": fields},
            {"path": str(tmp_path / "b.parquet"), "fields": fields},
        ],
        system_prompt="시스템",
    )
    assert rejected == []
    rows = list(splits["train"]) + list(splits["eval"])
    assert len(rows) == 16
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)
    assert rows[0]["messages"][0]["content"] == "시스템"


def test_split_is_deterministic_and_the_hash_follows_content(tmp_path: Path):
    source = _write_jsonl(tmp_path / "d.jsonl", [_chat(f"q{i}", f"a{i}") for i in range(50)])
    first = DataConfig(sources=[{"path": str(source)}], eval_fraction=0.2)
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    out1.mkdir(), out2.mkdir()
    a = build_dataset(first, out1, "k")
    b = build_dataset(first, out2, "k")
    assert a.dataset_sha == b.dataset_sha
    assert list(load_from_disk(a.dataset_dir)["eval"]) == list(load_from_disk(b.dataset_dir)["eval"])
    key = dataset_key(first)
    _write_jsonl(source, [_chat(f"q{i}", f"a{i}") for i in range(51)])
    assert dataset_key(first) != key


def test_nothing_usable_fails_naming_the_source(tmp_path: Path):
    source = _write_jsonl(tmp_path / "empty.jsonl", [_chat("q", " "), {"x": 1}])
    with pytest.raises(DatasetError, match=r"no usable rows in \['.*empty.jsonl'\]"):
        _build(tmp_path, sources=[{"path": str(source)}])


def test_missing_file_is_named(tmp_path: Path):
    config = DataConfig(sources=[{"path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(FileNotFoundError, match=r"data\.sources\[0\]\.path: file not found: .*nope\.jsonl"):
        dataset_key(config)
