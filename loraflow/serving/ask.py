"""Ask the served model through the `openai` client (the end of `make demo`):

    python -m loraflow.serving.ask --config configs/tiny-ko.yaml "대한민국 헌법 제1조는 무엇입니까?"

Lists /v1/models, then answers with the stable name (the champion) and with the versioned name it resolves to.
"""

from __future__ import annotations

import argparse
import sys

from openai import OpenAI

from loraflow.config import load_config
from loraflow.serving.vllm_server import api_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraflow.serving.ask", description=__doc__)
    parser.add_argument("--config", default="configs/tiny-ko.yaml")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("prompt", nargs="?", default="대한민국 헌법 제1조는 무엇입니까?")
    args = parser.parse_args(argv)
    job = load_config(args.config)
    stable = job.registry.model_name
    # vLLM ignores the key when none is configured; the client insists on some value.
    client = OpenAI(base_url=f"http://{job.serving.host}:{job.serving.port}/v1", api_key=api_key(job.serving) or "none")
    models = {m.id: m for m in client.models.list().data}
    print("models:", ", ".join(sorted(models)))
    if stable not in models:
        print(
            f"{stable!r} is not served: no champion passed its canary yet (python -m flows.serve)",
            file=sys.stderr,
        )
        return 1
    for name in (stable, models[stable].root):
        reply = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": args.prompt}],
            max_tokens=args.max_tokens,
            temperature=0,
        )
        print(f"\n[{name} -> {reply.model}] {args.prompt}\n{reply.choices[0].message.content}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
