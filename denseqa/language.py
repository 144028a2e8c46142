"""Which language a collection of texts is written in, and which languages a model was trained on.

Two decisions hang on it: BM25's tokenizer (Korean words carry their particles and endings, so a regex that
splits on spaces indexes "패키지는", "패키지를" and "패키지" as three terms; morphemes fix that) and the
warning that a model will embed a language it never saw (the bundled all-MiniLM-L6-v2 is English-only: on
Korean text its dense search is far below BM25).

The language is told by script, which is all these decisions need: the share of Hangul, kana, Han, Cyrillic...
among a sample's letters. Written here rather than taken from a language-identification library because those
ship models of their own for what a character-range count answers (Latin-script languages are not told apart,
and need not be).
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable

# Scripts by the first word of their characters' Unicode names.
_SCRIPTS = {"HANGUL": "hangul", "HIRAGANA": "kana", "KATAKANA": "kana", "CJK": "han", "CYRILLIC": "cyrillic",
            "ARABIC": "arabic", "HEBREW": "hebrew", "GREEK": "greek", "THAI": "thai", "DEVANAGARI": "devanagari",
            "LATIN": "latin"}
# The script each language code is written in (ISO 639-1, as in model cards); any other code: Latin.
_LANGUAGE_SCRIPT = {"ko": "hangul", "ja": "kana", "zh": "han", "ru": "cyrillic", "uk": "cyrillic", "bg": "cyrillic",
                    "sr": "cyrillic", "ar": "arabic", "fa": "arabic", "ur": "arabic", "he": "hebrew", "el": "greek",
                    "th": "thai", "hi": "devanagari", "mr": "devanagari", "ne": "devanagari"}
_SCRIPT_LANGUAGE = {"hangul": "ko", "kana": "ja", "han": "zh", "thai": "th", "hebrew": "he", "greek": "el"}
_SCRIPT_NAMES = {"hangul": "Korean", "kana": "Japanese", "han": "Chinese", "cyrillic": "Cyrillic-script",
                 "arabic": "Arabic-script", "hebrew": "Hebrew", "greek": "Greek", "thai": "Thai",
                 "devanagari": "Devanagari-script", "latin": "Latin-script"}
# A script holding this share of a sample's letters is the texts' script (Korean text carries Latin package names,
# product names and code: Hangul is rarely all of it).
MAIN_SCRIPT_SHARE = 0.3
SAMPLE_CHARS = 200_000


def script_shares(texts: Iterable[str], max_chars: int = SAMPLE_CHARS) -> dict[str, float]:
    """Share of each script among the letters of ``texts`` (read up to ``max_chars`` characters)."""
    counts: Counter[str] = Counter()
    seen = 0
    for text in texts:
        for ch in text[:max_chars - seen]:
            if ch.isalpha():
                name = unicodedata.name(ch, "")
                counts[_SCRIPTS.get(name.split(" ", 1)[0], "other")] += 1
        seen += min(len(text), max_chars - seen)
        if seen >= max_chars:
            break
    total = sum(counts.values())
    return {script: n / total for script, n in counts.most_common()} if total else {}


def main_script(texts: Iterable[str]) -> str | None:
    """The texts' script: the non-Latin script with the largest share if it reaches :data:`MAIN_SCRIPT_SHARE`
    (Japanese: a tenth of kana, since Japanese text is mostly Han; Korean: a tenth of Hangul, since one syllable
    block holds what takes two or three Latin letters, and Korean text about code is mostly Latin letters), else
    Latin; None when there are no letters."""
    shares = script_shares(texts)
    if not shares:
        return None
    for dense_script in ("kana", "hangul"):
        # Taking such text for Latin costs more than the reverse: Kiwi keeps Latin words as the regex does.
        if shares.get(dense_script, 0) >= 0.1:
            return dense_script
    others = [(share, script) for script, share in shares.items() if script not in ("latin", "other")]
    if others and max(others)[0] >= MAIN_SCRIPT_SHARE:
        return max(others)[1]
    return "latin"


def is_korean(texts: Iterable[str]) -> bool:
    return main_script(texts) == "hangul"


def model_languages(model_dir: str | None) -> list[str] | None:
    """The languages a model folder was trained on: its model card's ``language`` (``multilingual`` when so
    tagged), else what denseqa recorded when it fine-tuned it (``denseqa.json``'s ``languages``); None: unknown."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    card = _front_matter(os.path.join(model_dir, "README.md"))
    languages = card.get("language")
    if isinstance(languages, str):
        languages = [languages]
    if "multilingual" in (card.get("tags") or []) or (languages and len(languages) > 10):
        return ["multilingual"]
    if languages:
        return [str(x) for x in languages]
    record = os.path.join(model_dir, "denseqa.json")
    if os.path.exists(record):
        with open(record) as f:
            recorded = json.load(f).get("languages")
        return list(recorded) if recorded else None
    return None


def _front_matter(path: str) -> dict:
    import yaml

    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text[3:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def language_mismatch(texts: Iterable[str], model_dir: str | None, model_name: str) -> str | None:
    """One warning line when the texts are in a script none of the model's languages is written in; else None
    (also when either side is unknown: no warning on a guess)."""
    languages = model_languages(model_dir)
    script = main_script(texts)
    if not languages or script is None or "multilingual" in languages:
        return None
    if script in {_LANGUAGE_SCRIPT.get(lang.split("-")[0].lower(), "latin") for lang in languages}:
        return None
    fitting = ("klue/roberta-base (fine-tune it with denseqa) or a multilingual model such as "
               "paraphrase-multilingual-MiniLM-L12-v2" if script == "hangul"
               else "a multilingual model such as paraphrase-multilingual-MiniLM-L12-v2")
    language = _SCRIPT_LANGUAGE.get(script)
    return (f"the texts are {_SCRIPT_NAMES[script]}{f' ({language})' if language else ''} and {model_name} was "
            f"trained on {', '.join(languages)}: its dense search will be weak here (compare bm25 and hybrid in "
            f"the evaluation); use {fitting} with --model")
