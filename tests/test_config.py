from pathlib import Path

import pytest

from loraflow.config import ConfigError, load_config
from loraflow.config.loader import apply_overrides, read_yaml


def test_shipped_configs_validate():
    tiny = load_config("configs/tiny-ko.yaml")
    qwen = load_config("configs/qwen-ko.yaml")
    assert tiny.model.is_embedded and tiny.quantization.method == "nf4"
    assert qwen.model.base == "Qwen/Qwen2.5-7B-Instruct"
    assert (qwen.lora.r, qwen.lora.alpha, qwen.lora.dropout) == (16, 32, 0.05)
    # The dtypes follow the GPU (bf16 where it has it, fp16 on a T4): tests/test_qwen_ko.py builds both.
    assert qwen.quantization.double_quant and (qwen.quantization.compute_dtype, qwen.model.dtype) == ("auto", "auto")
    assert set(qwen.lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_unknown_key_and_bad_value_name_the_field_path():
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny-ko.yaml", {"lora.rank": 8, "training.learning_rate": -1})
    message = str(error.value)
    assert "configs/tiny-ko.yaml" in message
    assert "lora.rank: unknown key" in message
    assert "training.learning_rate: Input should be greater than 0" in message


def test_nested_source_error_names_the_list_index(tmp_path: Path):
    raw = read_yaml("configs/tiny-ko.yaml")
    raw["data"]["sources"][1] = {"path": "x.jsonl", "hub_id": "a/b"}
    bad = tmp_path / "bad.yaml"
    import yaml

    bad.write_text(yaml.safe_dump(raw, allow_unicode=True))
    with pytest.raises(
        ConfigError, match=r"data\.sources\.1: Value error, set exactly one of `path` or `hub_id`"
    ):
        load_config(bad)


def test_overrides_merge_dotted_and_nested():
    job = load_config("configs/tiny-ko.yaml", {"training.epochs": 3, "lora": {"r": 8}})
    assert job.training.epochs == 3 and job.lora.r == 8 and job.lora.alpha == 32
    raw = {"a": {"b": 1, "c": 2}}
    assert apply_overrides(raw, {"a.b": 5}) == {"a": {"b": 5, "c": 2}}
    assert raw == {"a": {"b": 1, "c": 2}}  # the input is not mutated


def test_missing_file_and_non_mapping_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listing)


def test_field_mapping_requires_prompt_and_response_together():
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.fields: Value error, `prompt` and `response`"):
        load_config(
            "configs/tiny-ko.yaml", {"data.sources": [{"path": "a.jsonl", "fields": {"prompt": "q"}}]}
        )


def test_errors_quote_the_meaning_of_the_field():
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny-ko.yaml", {"training.learning_rate": 0, "lora.target_modules": "q_proj",
                                             "data.sources": [{"path": "a.jsonl", "limit": 0}], "lora.rank": 8})
    lines = str(error.value).splitlines()
    assert "  training.learning_rate: Input should be greater than 0 (got 0) -- The peak learning rate " \
           "(after warm-up)." in lines
    # Through a list index and pydantic's union-member tags, to the field's own description.
    assert any(line.startswith("  data.sources.0.limit: Input should be greater than 0 (got 0) -- Read at most")
               for line in lines), lines
    assert any(line.startswith("  lora.target_modules.literal['all-linear']: ") and line.endswith(
        "-- The module names that get an adapter, or `all-linear` (peft: every linear layer but the head).")
        for line in lines), lines
    # An unknown key and a section-wide rule have no field to describe.
    assert "  lora.rank: unknown key (got 8)" in lines
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny-ko.yaml", {"serving.max_loras": 1})
    assert str(error.value).splitlines()[-1] == ("  serving: Value error, `max_loras` (1) must hold the 2 aliased "
                                                 "versions (champion, challenger)")
    # The endpoint's fields of earlier versions are gone: a config naming one is told so.
    with pytest.raises(ConfigError, match=r"serving\.vllm_port: unknown key"):
        load_config("configs/tiny-ko.yaml", {"serving.vllm_port": 8001})
