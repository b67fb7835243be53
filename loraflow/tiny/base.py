"""Build the embedded `tiny-ko` base model: a byte-level BPE tokenizer with Qwen special tokens and a small
Qwen2ForCausalLM briefly pretrained on the Korean corpus. Deterministic from the seed and the libraries that train
it; built once per machine, keyed by all of these (loraflow/tiny/shared_models.py)."""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from loraflow.hashing import code_sha, sha_of
from loraflow.logs import progress
from loraflow.templates import load_template
from loraflow.tiny import corpus
from loraflow.tiny.shared_models import built_model

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
SEED = 1234
VOCAB_SIZE = 4096
# head_dim = hidden/heads = 32: a size vLLM's CPU attention supports.
ARCH = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
PRETRAIN = {"steps": 300, "batch_size": 16, "block_size": 128, "learning_rate": 3e-3}
TRAINED_BY = ("torch", "tokenizers", "transformers")


def build_key() -> str:
    """The recipe: settings, this code, the corpus and the versions of the libraries that train the model."""
    versions = {name: metadata.version(name) for name in TRAINED_BY}
    return sha_of(SEED, VOCAB_SIZE, ARCH, PRETRAIN, versions, code_sha(__name__, corpus.__name__))[:12]


def tiny_ko_dir() -> Path:
    """Path of the built model under LORAFLOW_HOME, from this machine's cache (built there first if it has none)."""
    return built_model(f"tiny-ko-{build_key()}", build)


def _train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        chat_template=load_template("qwen2.5"),
        model_max_length=ARCH["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def _pretrain(model: Qwen2ForCausalLM, ids: torch.Tensor) -> list[float]:
    generator = torch.Generator().manual_seed(SEED)
    block, batch = PRETRAIN["block_size"], PRETRAIN["batch_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["learning_rate"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=PRETRAIN["learning_rate"], total_steps=PRETRAIN["steps"], pct_start=0.1
    )
    losses: list[float] = []
    model.train()
    for _ in progress(range(PRETRAIN["steps"]), desc="pretraining tiny-ko"):
        starts = torch.randint(0, ids.numel() - block - 1, (batch,), generator=generator)
        chunk = torch.stack([ids[s : s + block] for s in starts])
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build(out_dir: Path) -> None:
    """Train tokenizer and model, saved into `out_dir` (a staging directory: built_model moves it into place whole)."""
    log.info("building the embedded tiny-ko base (once per machine, about two minutes on 2 cores)")
    torch.manual_seed(SEED)
    texts = corpus.all_texts()
    tokenizer = _train_tokenizer(texts)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # Whole documents, longer than the model's context on purpose: pretraining samples windows of them.
    ids = torch.tensor([t for text in texts for t in [*tokenizer(text, verbose=False)["input_ids"], end]])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=end,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **ARCH,
    )
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config)
    losses = _pretrain(model, ids)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "pretrain.json").write_text(
        json.dumps({"tokens": ids.numel(), "first_loss": losses[0], "last_loss": losses[-1]}, indent=2)
    )
    log.info("tiny-ko pretrain loss %.3f -> %.3f", losses[0], losses[-1])
