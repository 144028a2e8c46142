"""Regenerate the README's configuration reference from the config models (a test checks they are equal)."""

from __future__ import annotations

from pathlib import Path

from denseqa.config import config_reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"

text = README.read_text(encoding="utf-8")
head, rest = text.split(START, 1)
README.write_text(head + START + config_reference_markdown() + END + rest.split(END, 1)[1], encoding="utf-8")
