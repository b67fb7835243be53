"""Korean public text shipped inside the `konlpy` wheel (read as files; no JVM needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources


def _corpus_root():
    return resources.files("konlpy") / "data" / "corpus"


def constitution_text() -> str:
    return (_corpus_root() / "kolaw" / "constitution.txt").read_text(encoding="utf-8")


def bill_texts() -> list[str]:
    folder = _corpus_root() / "kobill"
    return [p.read_text(encoding="utf-8") for p in sorted(folder.iterdir(), key=lambda p: p.name)]


def all_texts() -> list[str]:
    return [constitution_text(), *bill_texts()]


@dataclass(frozen=True)
class Article:
    number: str  # e.g. "10" or "10조의2"
    chapter: str
    text: str


_ARTICLE = re.compile(r"^\s*제(\d+)조(?:의(\d+))?\s*(.*)$")
_CHAPTER = re.compile(r"^\s*제(\d+)장\s*(.*)$")
_ADDENDA = re.compile(r"부칙")


def constitution_articles() -> list[Article]:
    """Split the constitution into articles (제N조 ...), each with its full text and chapter title."""
    articles: list[Article] = []
    chapter = "전문"
    number: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if number is not None:
            text = " ".join(line.strip() for line in lines if line.strip())
            articles.append(Article(number=number, chapter=chapter, text=text))

    for raw in constitution_text().splitlines():
        if match := _CHAPTER.match(raw):
            flush()
            number, lines = None, []
            chapter = f"제{match.group(1)}장 {match.group(2).strip()}".strip()
        elif _ADDENDA.search(raw) and not _ARTICLE.match(raw):
            flush()
            number, lines = None, []
            chapter = "부칙"
        elif match := _ARTICLE.match(raw):
            flush()
            number = match.group(1) + (f"조의{match.group(2)}" if match.group(2) else "")
            lines = [match.group(3)]
        elif number is not None:
            lines.append(raw)
    flush()
    return articles
