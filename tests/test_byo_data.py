"""Data as people have it (ShareGPT, OpenAI messages with tools, alpaca, prompt/response, a text/label CSV): the data
step reads each, rejects bad rows with file, row and reason, and masks exactly the assistant's turns; `loraflow new`
writes a job that loads, `loraflow data` says what will train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from loraflow.base.load import load_tokenizer
from loraflow.cli import main
from loraflow.config import load_config
from loraflow.config.data import DataConfig
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.data.build_dataset import DatasetError, build_dataset
from loraflow.data.format_chat import format_chat
from loraflow.data.keys import dataset_key
from tests.fixtures.byo_data import (
    CITIES,
    assert_mask_token_by_token,
    sharegpt_rows,
    tool_rows,
    write_label_csv,
    write_shapes,
)
from tests.fixtures.sources import SHA1, hub_rows, hub_snapshot, write_jsonl

pytest_plugins = ["tests.fixtures.sources"]  # the `hub_cache` fixture
SHAREGPT = {"messages": "conversations", "role_key": "from", "content_key": "value"}


def _build(tmp_path: Path, path: Path, fields: dict | None = None) -> tuple:
    data = DataConfig(sources=[{"path": str(path), **({"fields": fields} if fields else {})}], eval_fraction=0.2)
    out = tmp_path / "dataset"
    out.mkdir(parents=True)
    result = build_dataset(data, out, dataset_key(data))
    rejected = {r["row"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    return result, rejected


def test_sharegpt_roles_and_function_calls_become_chat_turns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows())
    result, rejected = _build(tmp_path, path, SHAREGPT)
    assert set(rejected) == {17}
    assert rejected[17]["file"] == "sharegpt.jsonl" and rejected[17]["reason"].startswith("turn 0: unknown role 'bot'")
    rows = [row for split in load_from_disk(result.dataset_dir).values() for row in split]
    assert len(rows) == 16 and result.stats["rows_with_tools"] == 4
    called = next(row for row in rows if row["tools"])
    assert [m["role"] for m in called["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = json.loads(called["messages"][1]["tool_calls"])
    assert call[0]["function"]["name"] == "local_time" and isinstance(call[0]["function"]["arguments"], dict)
    assert json.loads(called["tools"])[0]["type"] == "function"  # a bare definition, wrapped as a client sends it


def test_tool_calls_train_and_tool_results_do_not_token_by_token(tmp_path: Path, tiny_base_dir: Path) -> None:
    path = write_jsonl(tmp_path / "tools.jsonl", tool_rows())
    result, rejected = _build(tmp_path, path)
    assert {row: r["reason"] for row, r in rejected.items()} == {
        13: "turn 1: a tool result without a tool call before it",
        14: "turn 1: the arguments of tool call 'weather': not JSON",
    }
    assert result.stats["train_rows"] + result.stats["eval_rows"] == len(CITIES)
    model, out = ModelConfig(base="embedded:tiny-ko"), tmp_path / "chat"
    out.mkdir()
    chat = format_chat(result, model, TrainingConfig(max_length=2048), out, "k")
    tokenizer = load_tokenizer(model)
    records, tokenized = load_from_disk(result.dataset_dir), load_from_disk(chat.tokenized_dir)
    for split in ("train", "eval"):
        for record, row in zip(records[split], tokenized[split], strict=True):
            assert_mask_token_by_token(tokenizer, record, row["input_ids"], row["assistant_masks"])
    text = tokenizer.decode(tokenized["train"][0]["input_ids"])
    assert '<tools>\n{"type": "function", "function": {"name": "weather"' in text
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "' in text  # an object, not a quoted string


def test_alpaca_input_is_joined_to_the_instruction(tmp_path: Path) -> None:
    paths = write_shapes(tmp_path)
    result, rejected = _build(tmp_path, paths["alpaca"], {"prompt": "instruction", "input": "input",
                                                          "response": "output"})
    assert [r["reason"] for r in rejected.values()] == ["turn 1: empty assistant turn"]
    users = {row["messages"][0]["content"] for split in load_from_disk(result.dataset_dir).values() for row in split}
    assert f"다음 문장을 요약하세요.\n{CITIES[0]}는 오래된 도시이고 사람이 많다." in users
    assert f"{CITIES[0]}를 한 문장으로 소개하세요." in users  # an empty input adds nothing


@pytest.mark.parametrize(("shape", "fields", "heldout"), [
    ("sharegpt", {**SHAREGPT, "roles": {"bot": "assistant"}}, False),  # a guess, listed under "check"
    ("tools", {"messages": "messages"}, False),
    ("alpaca", {"prompt": "instruction", "input": "input", "response": "output"}, False),
    ("prompt_response", {"prompt": "question", "response": "answer"}, False),
    ("labels", {"prompt": "text", "response_template": "{label}"}, True),
])
def test_loraflow_new_writes_a_job_that_loads(shape: str, fields: dict, heldout: bool, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    path = write_shapes(tmp_path / "data")[shape]
    config = tmp_path / "configs" / f"{shape}.yaml"
    assert main(["new", shape.replace("_", "-"), "--data", str(path), "--output", str(config)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {config}" in printed and "inferred:" in printed
    text = config.read_text()
    assert text.startswith("# yaml-language-server: $schema=")
    assert f"#   loraflow run {config.as_posix()}" in text
    job = load_config(config)
    assert job.data.sources[0].path == str(path) and job.model.base == "embedded:tiny-ko"
    assert job.data.sources[0].fields.model_dump(exclude_defaults=True) == fields
    assert job.eval.heldout.enabled is heldout
    assert [r.metric for r in job.promotion.require] == (["heldout/accuracy"] if heldout else [])
    if heldout:
        assert "labels: 1 (37), 0 (36)" in printed
        assert "integer ids (0..1)" in text  # a check for the user: name the ids


def test_loraflow_new_never_overwrites_silently(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, config = write_shapes(tmp_path)["prompt_response"], tmp_path / "job.yaml"
    config.write_text("# mine\n")
    assert main(["new", "job", "--data", str(path), "--output", str(config)]) == 1
    assert "exists; --force overwrites it" in capsys.readouterr().err and config.read_text() == "# mine\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["new", "job", "--data", str(empty), "--output", str(config), "--force"]) == 1
    assert f"--data {empty}: no rows" in capsys.readouterr().err and config.read_text() == "# mine\n"
    assert main(["new", "job", "--data", str(path), "--output", str(config), "--force"]) == 0
    assert load_config(config).name == "job"


def test_loraflow_new_reads_a_hub_dataset_from_the_hub_cache(hub_cache: Path, tmp_path: Path) -> None:
    hub_snapshot(hub_cache, "datasets--org--qa", SHA1, {"data.jsonl": hub_rows("질문", 12)})
    config = tmp_path / "hub.yaml"
    assert main(["new", "hub", "--data", "org/qa", "--output", str(config)]) == 0
    source = load_config(config).data.sources[0]
    assert source.hub_id == "org/qa" and source.fields.prompt == "instruction"


def test_bad_inputs_name_the_file_and_row(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match=r"data.sources\[0\]: no rows in .*empty.csv"):
        _build(tmp_path, empty)
    unknown = write_jsonl(tmp_path / "bots.jsonl", [{"conversations": [{"from": "bot", "value": "a"}]}] * 2)
    with pytest.raises(DatasetError, match=r"unknown role 'bot'.*first: .*bots.jsonl row 1: turn 0: unknown role"):
        _build(tmp_path / "b", unknown, SHAREGPT)


def test_loraflow_data_says_what_it_dropped_and_marks_the_trained_tokens(tmp_path: Path, tiny_base_dir: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """The issue's CSV: every row exported several times and two broken rows; the summary and a warning say so."""
    path, config = write_label_csv(tmp_path / "intents.csv", copies=5), tmp_path / "intents.yaml"
    assert main(["new", "intents", "--data", str(path), "--output", str(config)]) == 0
    capsys.readouterr()
    assert main(["data", str(config), "--rows", "1"]) == 0
    printed = capsys.readouterr().out
    assert "build_dataset: 362 rows read, 72 kept (20%)" in printed and "288 exact duplicates dropped" in printed
    assert "- rejected: column(s) ['label'] empty (1)" in printed and "empty user turn (1)" in printed
    assert "warning: build_dataset kept 72 of 362 rows (20%)" in printed
    assert "<|im_start|>assistant\n⟦0<|im_end|>⟧" in printed or "<|im_start|>assistant\n⟦1<|im_end|>⟧" in printed


def test_loraflow_new_with_a_hub_base_writes_the_qlora_recipe(tmp_path: Path) -> None:
    config = tmp_path / "qa.yaml"
    path = write_shapes(tmp_path / "data")["prompt_response"]
    assert main(["new", "qa", "--data", str(path), "--base", "Qwen/Qwen2.5-1.5B-Instruct", "--output",
                 str(config)]) == 0
    job = load_config(config)
    assert (job.model.base, job.model.revision, job.quantization.method) == ("Qwen/Qwen2.5-1.5B-Instruct", "main",
                                                                             "nf4")
    assert job.training.gradient_checkpointing and "--base Qwen/Qwen2.5-1.5B-Instruct" in config.read_text()
