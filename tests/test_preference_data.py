"""Preference pairs (training.method dpo) through the data steps: mapped from a file's columns as strings or lists of
messages, checked row by row into rejected.jsonl with reasons, and tokenized by format_chat into the ids TRL's
DPOTrainer reads, each answer ending with <|im_end|>."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk

from loraflow.config import ConfigError, load_config
from loraflow.config.data import DataConfig
from loraflow.data.build_dataset import build_dataset
from loraflow.data.format_chat import format_chat
from loraflow.data.keys import chat_key, dataset_key
from tests.fixtures import TINY_CONFIG

PAIR = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
SYSTEM = "당신은 친절한 상담원입니다."


def write_jsonl(path: Path, rows: list) -> Path:
    """JSON lines; a str row is written as it is (a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def build(tmp_path: Path, sources: list[dict], **data) -> tuple[list[dict], dict]:
    config = DataConfig.model_validate({"sources": sources, "eval_fraction": 0.2, "system_prompt": SYSTEM, **data})
    out = tmp_path / "dataset"
    out.mkdir()
    result = build_dataset(config, out, dataset_key(config))
    splits = load_from_disk(result.dataset_dir)
    return [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()], {
        "rows": [*splits["train"], *splits["eval"]], "result": result}


def test_bad_pairs_are_rejected_with_reasons_and_good_pairs_survive(tmp_path: Path) -> None:
    good = [{"prompt": f"질문 {i}", "chosen": f"좋은 답 {i}입니다.", "rejected": f"나쁜 답 {i}"} for i in range(8)]
    good += [{"prompt": user(f"대화 {i}"), "chosen": assistant(f"네, {i}입니다."), "rejected": assistant(f"{i}.")}
             for i in range(8)]
    bad = [
        {"prompt": "같은 답", "chosen": "예", "rejected": " 예 "},
        {"prompt": "거절 없음", "chosen": "예"},
        {"prompt": "역할", "chosen": "예", "rejected": user("아니요")},
        {"prompt": "두 턴", "chosen": [*assistant("예"), *assistant("또")], "rejected": "아니요"},
        {"prompt": [*user("질문"), *assistant("답")], "chosen": "예", "rejected": "아니요"},
        {"prompt": [{"role": "robot", "content": "삐"}], "chosen": "예", "rejected": "아니요"},
        {"prompt": "빈 답", "chosen": "  ", "rejected": "아니요"},
        {"prompt": "긴 답", "chosen": "가" * 300, "rejected": "아니요"},
        {"prompt": "숫자", "chosen": 3, "rejected": "아니요"},
        "{not json",
        good[0],
    ]
    source = write_jsonl(tmp_path / "pairs.jsonl", [*good, *bad])
    rejected, built = build(tmp_path, [{"path": str(source), "fields": PAIR}], max_chars_per_turn=200)
    reasons = {r["row"]: r["reason"] for r in rejected}
    first = len(good) + 1
    assert reasons == {
        first: "chosen and rejected are the same answer",
        first + 1: "missing field(s) ['rejected']; the row's columns are ['chosen', 'prompt']",
        first + 2: "rejected must be one assistant turn (got roles ['user'])",
        first + 3: "chosen must be one assistant turn (got roles ['assistant', 'assistant'])",
        first + 4: "prompt must be [system] user (assistant user)*, ending with the user turn the answers reply to",
        first + 5: "prompt turn 0: unknown role 'robot'",
        first + 6: "chosen turn 0: empty assistant turn",
        first + 7: "chosen turn 0: 300 chars > max_chars_per_turn 200",
        first + 8: "field 'chosen' is neither text nor a list of turns",
        first + 9: reasons[first + 9],  # the JSON parser's own words
        first + 10: "exact duplicate of an earlier row",
    }, reasons
    assert reasons[first + 9].startswith("invalid JSON")
    assert all(r["source"] == str(source) and r["file"] == "pairs.jsonl" for r in rejected)
    # Strings and messages alike become TRL's conversational format, the job's system prompt first.
    rows = built["rows"]
    assert len(rows) == len(good) and built["result"].stats["rejected_rows"] == len(bad)
    assert {"prompt": [{"role": "system", "content": SYSTEM}, *user("질문 3")], "chosen": assistant("좋은 답 3입니다."),
            "rejected": assistant("나쁜 답 3")} in rows


def test_without_a_prompt_column_the_shared_turns_are_the_prompt(tmp_path: Path) -> None:
    """TRL's implicit-prompt format: chosen and rejected are whole conversations; a pair whose answers diverge
    before the last turn has no single reply to judge and is rejected."""
    question = [*user("헌법 제1조는?"), *assistant("제1조입니다."), *user("어느 장입니까?")]
    rows = [{"chosen": [*question, *assistant(f"제1장 총강입니다 {i}.")],
             "rejected": [*question, *assistant("모릅니다.")]} for i in range(6)]
    rows += [
        {"chosen": [*user("a"), *assistant("b")], "rejected": [*user("a"), *assistant("b")]},
        {"chosen": [*user("a"), *assistant("b"), *user("c"), *assistant("d")],
         "rejected": [*user("a"), *assistant("x"), *user("c"), *assistant("d")]},
    ]
    source = write_jsonl(tmp_path / "implicit.jsonl", rows)
    rejected, built = build(tmp_path, [{"path": str(source), "fields": {"chosen": "chosen", "rejected": "rejected"}}])
    assert {r["row"]: r["reason"] for r in rejected} == {
        7: "chosen and rejected are the same conversation",
        8: "chosen must be one assistant turn (got roles ['assistant', 'user', 'assistant'])"}
    pair = next(row for row in built["rows"] if row["chosen"] == assistant("제1장 총강입니다 0."))
    assert pair["prompt"] == [{"role": "system", "content": SYSTEM}, *question]
    assert pair["rejected"] == assistant("모릅니다.")


def test_a_mapping_that_does_not_fit_the_method_fails_naming_the_field() -> None:
    pair_source = {"path": "data/tiny-ko-dpo/article_pairs.jsonl", "fields": PAIR}
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.fields: training\.method sft maps `messages`"):
        load_config(TINY_CONFIG, {"data.sources": [pair_source]})
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.fields: training\.method dpo maps `prompt`"):
        load_config("configs/tiny-ko-dpo.yaml", {"data.sources": [pair_source, {"path": "data/tiny-ko"}]})
    with pytest.raises(ConfigError, match=r"`chosen` and `rejected` must be set together"):
        load_config("configs/tiny-ko-dpo.yaml", {"data.sources": [{"path": "x.jsonl", "fields": {"chosen": "c"}}]})
    with pytest.raises(ConfigError, match=r"a preference pair maps .* unset \['response'\]"):
        load_config("configs/tiny-ko-dpo.yaml", {"data.sources": [
            {"path": "x.jsonl", "fields": {**PAIR, "response": "r"}}]})


def test_format_chat_tokenizes_each_answer_as_the_span_after_the_prompt(tmp_path: Path, tiny_base_dir: Path) -> None:
    job = load_config("configs/tiny-ko-dpo.yaml")
    rows = [{"prompt": user(f"질문 {i}"), "chosen": assistant(f"네, 답은 {i}입니다."), "rejected": assistant("몰라")}
            for i in range(10)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    _, built = build(tmp_path, [{"path": str(source), "fields": PAIR}])
    dataset = built["result"]
    out = tmp_path / "chat"
    out.mkdir()
    chat = format_chat(dataset, job.model, job.training, out, chat_key(dataset, job.model, job.training))
    tokenized = load_from_disk(chat.tokenized_dir)
    assert tokenized["train"].column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    from loraflow.base.load import load_tokenizer

    tokenizer = load_tokenizer(job.model)
    pair = tokenized["train"][0]
    prompt = tokenizer.decode(pair["prompt_ids"])
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n질문 ")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")  # TRL's prompt: the generation header included
    assert tokenizer.decode(pair["rejected_ids"]) == "몰라<|im_end|>"
    assert tokenizer.decode(pair["chosen_ids"]).endswith("입니다.<|im_end|>")
    # Tokens a step reads: both sequences of each pair; the key follows the method.
    lengths = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in tokenized["train"]]
    assert chat.stats["train_tokens"] == sum(lengths)
    sft = job.training.model_copy(update={"method": "sft", "init_from": None})
    assert chat_key(dataset, job.model, sft) != chat.key
