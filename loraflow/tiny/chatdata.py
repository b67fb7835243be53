"""Generate the tiny-ko instruction data from the constitution, deterministically.

The output is committed under data/tiny-ko/ and read by `build_dataset` exactly like any user's local file:
`constitution_qa.jsonl` has KoAlpaca-style `instruction`/`output` columns (mapped by the config), and
`constitution_chat.jsonl` has `messages` plus a few deliberately broken rows that the pipeline must reject.
Regenerate with `python -m loraflow.tiny.chatdata`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from loraflow.tiny.corpus import Article, constitution_articles

OUT_DIR = Path("data/tiny-ko")
SEED = 7


def article_title(article: Article) -> str:
    prefix = "부칙 " if article.chapter == "부칙" else ""
    return f"{prefix}제{article.number}조"


def _first_sentence(text: str) -> str:
    body = re.sub(r"^[①-⑳]\s*", "", text)
    match = re.search(r"^.*?다\.", body)
    return match.group(0) if match else body


def qa_rows(articles: list[Article]) -> list[dict[str, str]]:
    rows = []
    for article in articles:
        title = article_title(article)
        rows += [
            {"instruction": f"대한민국 헌법 {title}의 내용을 알려 주세요.", "output": article.text},
            {"instruction": f"헌법 {title}는 어느 장에 속합니까?",
             "output": f"{title}는 {article.chapter}에 속합니다."},
            {"instruction": f"다음 조문의 요지를 한 문장으로 말해 주세요.\n{article.text}",
             "output": _first_sentence(article.text)},
        ]
    return rows


def chat_rows(articles: list[Article]) -> list[dict]:
    rows = []
    for article in articles:
        title = article_title(article)
        rows.append({"messages": [
            {"role": "user", "content": f"다음 조문은 헌법 몇 조입니까?\n{article.text}"},
            {"role": "assistant", "content": f"헌법 {title}입니다."},
        ]})
    # Rows a real dataset contains and the pipeline must reject with a reason (and keep going).
    rows += [
        {"messages": [{"role": "user", "content": "헌법 제1조는?"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "narrator", "content": "역할이 잘못된 행"},
                      {"role": "assistant", "content": "응답"}]},
        {"messages": [{"role": "user", "content": "응답이 없는 질문"}]},
        {"messages": "문자열은 대화가 아니다"},
        rows[0],  # exact duplicate
    ]
    return rows


def write(out_dir: Path = OUT_DIR) -> None:
    articles = constitution_articles()
    rng = random.Random(SEED)
    qa, chat = qa_rows(articles), chat_rows(articles)
    rng.shuffle(qa)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("constitution_qa.jsonl", qa), ("constitution_chat.jsonl", chat)):
        with (out_dir / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write()
