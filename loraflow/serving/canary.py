"""The canary a version passes before any served name points at it.

vLLM silently serves the base when an adapter's target modules do not match the model (vllm#34186), so a load
that "succeeds" proves nothing: the adapter must change greedy output versus the base. And the adapter must
have been trained with the chat template the server renders (its `template_sha` tag), else prompts differ
from training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraflow.config.serving import CanaryConfig
from loraflow.hashing import sha_of_text
from loraflow.serving.client import ServerClient

TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class CanaryVerdict:
    passed: bool
    reason: str
    changed: int = 0


def adapter_template_sha(adapter_dir: str | Path) -> str | None:
    """sha256 of the chat template the train step saved next to the adapter (None when it saved none)."""
    file = Path(adapter_dir) / TEMPLATE_FILE
    return sha_of_text(file.read_text(encoding="utf-8")) if file.is_file() else None


def check_template(adapter_dir: str | Path, recorded_sha: str | None, served_sha: str) -> CanaryVerdict | None:
    """A failing verdict when the adapter's template differs from its `template_sha` tag or the server's."""
    found = adapter_template_sha(adapter_dir)
    if found is None:
        return CanaryVerdict(False, f"no {TEMPLATE_FILE} in the adapter directory")
    if recorded_sha is None:
        return CanaryVerdict(False, "version has no template_sha tag")
    if found != recorded_sha:
        return CanaryVerdict(False, f"adapter template sha {found[:12]} != template_sha tag {recorded_sha[:12]}")
    if found != served_sha:
        return CanaryVerdict(False, f"adapter template sha {found[:12]} != served template sha {served_sha[:12]}")
    return None


def check_output_changes(
    client: ServerClient, adapter_name: str, base_name: str, config: CanaryConfig
) -> CanaryVerdict:
    changed = 0
    for prompt in config.prompts:
        adapted = client.greedy_chat(adapter_name, prompt, config.max_tokens)
        if adapted != client.greedy_chat(base_name, prompt, config.max_tokens):
            changed += 1
    if changed < config.min_changed:
        return CanaryVerdict(
            False,
            f"greedy output equals the base's on {len(config.prompts) - changed}/"
            f"{len(config.prompts)} prompts (adapter not applied?)",
            changed,
        )
    return CanaryVerdict(True, f"output differs from base on {changed}/{len(config.prompts)} prompts", changed)


def run_canary(
    client: ServerClient,
    adapter_name: str,
    adapter_dir: str | Path,
    base_name: str,
    recorded_template_sha: str | None,
    served_template_sha: str,
    config: CanaryConfig,
) -> CanaryVerdict:
    """Template first (cheap, no server call), then output vs base on the already loaded adapter."""
    bad_template = check_template(adapter_dir, recorded_template_sha, served_template_sha)
    if bad_template is not None:
        return bad_template
    return check_output_changes(client, adapter_name, base_name, config)
