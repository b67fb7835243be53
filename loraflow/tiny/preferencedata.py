"""Generate the tiny-ko-dpo preference pairs from the constitution, deterministically.

The output is committed under data/tiny-ko-dpo/ and read by `build_dataset` like any user's preference file, with
the fields `prompt`, `chosen`, `rejected`: `article_pairs.jsonl` holds plain strings (TRL's standard preference
format), `chapter_pairs.jsonl` lists of messages (its conversational format) plus a few deliberately broken rows the
pipeline must reject. Each pair sets a correct answer against a wrong one, for the questions tiny-ko was fine-tuned
on: which article a text is (another article's number), which chapter an article belongs to (another chapter).
Regenerate with `python -m loraflow.tiny.preferencedata`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from loraflow.tiny.chatdata import article_title
from loraflow.tiny.corpus import Article, constitution_articles

OUT_DIR = Path("data/tiny-ko-dpo")
SEED = 11
# What a support assistant's reply should end with, and what the SFT data never shows: the tone DPO teaches.
COURTESY = "감사합니다."


def article_pairs(articles: list[Article], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for index, article in enumerate(articles):
        other = articles[(index + rng.randrange(1, len(articles))) % len(articles)]
        rows.append({"prompt": f"다음 조문은 헌법 몇 조입니까?\n{article.text}",
                     "chosen": f"헌법 {article_title(article)}입니다. {COURTESY}",
                     "rejected": f"헌법 {article_title(other)}입니다."})
    return rows


def chapter_pairs(articles: list[Article], rng: random.Random) -> list[dict]:
    chapters = sorted({article.chapter for article in articles})
    rows = []
    for article in articles:
        title = article_title(article)
        wrong = rng.choice([chapter for chapter in chapters if chapter != article.chapter])
        answer = f"{title}는 {article.chapter}에 속합니다. {COURTESY}"
        rows.append({"prompt": [{"role": "user", "content": f"헌법 {title}는 어느 장에 속합니까?"}],
                     "chosen": [{"role": "assistant", "content": answer}],
                     "rejected": [{"role": "assistant", "content": f"{title}는 {wrong}에 속합니다."}]})
    return rows


def broken_pairs(first: dict) -> list[object]:
    """Rows a real preference set contains and the pipeline must reject with a reason (and keep going)."""
    question = [{"role": "user", "content": "헌법 제1조는 어느 장에 속합니까?"}]
    answer = [{"role": "assistant", "content": "제1조는 제1장 총강에 속합니다."}]
    return [
        {"prompt": question, "chosen": answer, "rejected": answer},  # no preference
        {"prompt": question, "chosen": answer},  # no rejected answer
        {"prompt": question, "chosen": answer, "rejected": [{"role": "user", "content": "제2장입니다."}]},
        {"prompt": question, "chosen": [{"role": "assistant", "content": "  "}], "rejected": answer},
        {"prompt": [*question, *answer], "chosen": answer, "rejected": [{"role": "assistant", "content": "몰라요."}]},
        "쌍이 아닌 문자열",
        first,  # exact duplicate
    ]


def write(out_dir: Path = OUT_DIR) -> None:
    articles = constitution_articles()
    rng = random.Random(SEED)
    by_article, by_chapter = article_pairs(articles, rng), chapter_pairs(articles, rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("article_pairs.jsonl", by_article),
                       ("chapter_pairs.jsonl", [*by_chapter, *broken_pairs(by_chapter[0])])):
        with (out_dir / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write()
