from pathlib import Path

import pytest
from datasets import load_from_disk

from loraflow.base.load import load_tokenizer
from loraflow.config.model import ModelConfig
from loraflow.data.format_chat import END_OF_TURN, ChatFormatError, assistant_spans, tokenize_conversation

CONVERSATION = [
    {"role": "system", "content": "도우미"},
    {"role": "user", "content": "제1조는?"},
    {"role": "assistant", "content": "대한민국은 민주공화국이다."},
    {"role": "user", "content": "제2조는?"},
    {"role": "assistant", "content": "국민이 되는 요건은 법률로 정한다."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_base_dir):
    return load_tokenizer(ModelConfig(base="embedded:tiny-ko"))


def test_mask_covers_exactly_each_reply_and_its_closing_im_end(tokenizer):
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    row = tokenize_conversation(tokenizer, CONVERSATION, end)
    spans = assistant_spans(row["assistant_masks"])
    labeled = [tokenizer.decode(row["input_ids"][a:b]) for a, b in spans]
    assert labeled == ["대한민국은 민주공화국이다.<|im_end|>", "국민이 되는 요건은 법률로 정한다.<|im_end|>"]
    # everything outside the spans (system, user turns, role headers, newlines) is not trained on
    outside = [t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if not m]
    assert "제1조는?" in tokenizer.decode(outside) and "assistant" in tokenizer.decode(outside)


def test_final_im_end_is_a_label_in_the_formatted_dataset(step_results):
    chat = step_results["chat"]
    data = load_from_disk(chat.tokenized_dir)["train"]
    tokenizer = load_tokenizer(ModelConfig(base="embedded:tiny-ko"))
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for row in data.select(range(20)):
        last = max(i for i, bit in enumerate(row["assistant_masks"]) if bit)
        assert row["input_ids"][last] == end
    assert chat.stats["train_assistant_tokens"] < chat.stats["train_tokens"]
    assert (Path(chat.path) / "token_lengths.png").stat().st_size > 1000


def test_template_without_generation_markers_is_refused(tokenizer):
    plain = tokenizer.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tokenizer_copy = load_tokenizer(ModelConfig(base="embedded:tiny-ko"))
    tokenizer_copy.chat_template = plain
    end = tokenizer_copy.convert_tokens_to_ids(END_OF_TURN)
    with pytest.raises(ChatFormatError, match="generation"):
        tokenize_conversation(tokenizer_copy, CONVERSATION, end)


def test_template_that_leaves_im_end_outside_the_mask_is_refused(tmp_path):
    tokenizer = load_tokenizer(ModelConfig(base="embedded:tiny-ko"))
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{- message.content + '<|im_end|>' }}\n        {%- endgeneration %}",
        "{{- message.content }}\n        {%- endgeneration %}{{- '<|im_end|>' }}",
    )
    assert "{%- endgeneration %}{{- '<|im_end|>' }}" in tokenizer.chat_template
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    with pytest.raises(ChatFormatError, match="never learn to stop"):
        tokenize_conversation(tokenizer, CONVERSATION, end)


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "description": "오늘 날씨",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "서울 날씨는?"},
    # What an OpenAI client sends back after a tool call: content null, the call under tool_calls.
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "서울"}}}]},
    {"role": "tool", "content": "맑음"},
    {"role": "assistant", "content": "서울은 맑습니다."},
]


def test_tool_turns_render_as_qwen_and_the_mask_covers_the_call(tokenizer):
    """Qwen2.5's tool calling survives the shipped template (vLLM renders chats with it): tools in the system turn,
    calls as <tool_call> JSON, results as <tool_response> in a user turn; the model is trained on its calls."""
    text = tokenizer.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL], tokenize=False)
    assert "# Tools\n\nYou may call one or more functions" in text and '"name": "weather"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "서울"}}\n</tool_call>'
            '<|im_end|>\n<|im_start|>user\n<tool_response>\n맑음\n</tool_response><|im_end|>\n') in text
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    row = tokenizer.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    labeled = [tokenizer.decode(row["input_ids"][a:b]) for a, b in assistant_spans(row["assistant_masks"])]
    assert labeled[0].startswith("\n<tool_call>") and labeled[0].endswith("</tool_call><|im_end|>")
    assert labeled[1] == "서울은 맑습니다.<|im_end|>"
    assert not any("tool_response" in span for span in labeled) and row["input_ids"].count(end) >= 4
