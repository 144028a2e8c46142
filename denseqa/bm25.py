"""BM25 over the corpus texts, with ``bm25s`` (Lù, 2024, "BM25S: Orders of magnitude faster lexical search").

The lexical baseline every dense retriever should be compared with (Karpukhin et al., 2020, "Dense Passage
Retrieval", Table 2), and half of the hybrid search. Documents are addressed by their position in the corpus
list, the same positions as the FAISS index and the docstore; after a live update, whose docstore keeps the rows
of deleted passages, the index holds the live texts only (BM25's statistics are over the corpus, so a deleted text
must not count) with each one's docstore position beside it.

Tokenization (``tokenizer``, recorded with the index so that queries are cut the same way everywhere):

- ``regex``: bm25s's own (lower-cased word characters, a stopword list): right for languages that put spaces
  between words and inflect little;
- ``kiwi``: Korean morphemes from Kiwi (kiwipiepy; Lee, 2022, "Kiwi: Developing a Korean Morphological Analyzer
  Based on Statistical Language Models and Skip-Bigram Models"), keeping the content words: nouns, verb and
  adjective stems, roots, and foreign words, numbers and Hanja (a Korean text names software in Latin letters).
  Particles and endings, which glue to Korean words and split their counts under the regex, are dropped;
- ``auto``: ``kiwi`` when the texts are Korean (:func:`denseqa.language.is_korean`), else ``regex``; resolved once
  when the index is built, so every later query, update and partition uses what the build chose.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from denseqa.errors import InputError


class NoTerms(InputError):
    """No text yields a term to index: a BM25 index of them cannot be built."""

PARAMS_FILE = "denseqa_bm25.json"
POSITIONS_FILE = "denseqa_positions.npy"
TOKENIZERS = ("auto", "regex", "kiwi")
# Kiwi's part-of-speech tags (Sejong tag set) whose morphemes are indexed, by prefix: general, proper and bound
# nouns; verb and adjective stems; roots; foreign words, numbers, Hanja; and Kiwi's web tokens (W_URL, W_EMAIL,
# W_SERIAL such as a version "2.4.1", W_HASHTAG, W_MENTION, W_EMOJI), which a query may name as they are. On the
# Korean Debian data (4,054 synopses against their descriptions) this set reaches MRR@10 0.7128 (0.7122 without
# the web tokens in the same run; 0.7124 in an earlier one); nouns, verbs and foreign words alone 0.705.
KIWI_KEPT_TAGS = ("NN", "VV", "VA", "XR", "SL", "SN", "SH", "W_")

_kiwi = None
_kiwi_lock = threading.Lock()


def resolve_tokenizer(name: str, texts: list[str]) -> str:
    """``regex`` or ``kiwi``: ``name`` itself, or for ``auto`` what the texts' language calls for."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown BM25 tokenizer {name!r}; one of {', '.join(TOKENIZERS)}")
    if name != "auto":
        return name
    from denseqa.language import is_korean

    return "kiwi" if is_korean(texts) else "regex"


def tokenize(texts: list[str], tokenizer: str, stopwords: str | None) -> list[list[str]]:
    """Each text's terms under ``tokenizer`` (``regex`` or ``kiwi``), without the stopwords."""
    import bm25s

    if tokenizer == "regex":
        return bm25s.tokenize(texts, stopwords=stopwords or [], return_ids=False, show_progress=False)
    if tokenizer != "kiwi":
        raise ValueError(f"BM25 tokenizer {tokenizer!r} cannot cut text; one of regex, kiwi")
    from bm25s.tokenization import _infer_stopwords  # bm25s's names of its lists (en, ko, ...), as the regex uses

    stop = set(_infer_stopwords(stopwords)) if stopwords else set()
    with _kiwi_lock:  # one analyser per process (it loads a model); its calls are not documented thread-safe
        global _kiwi
        if _kiwi is None:
            from kiwipiepy import Kiwi

            _kiwi = Kiwi(num_workers=kiwi_workers())
        analysed = _kiwi.tokenize(texts) if len(texts) > 1 else [_kiwi.tokenize(texts[0])] if texts else []
        return [[form for form in (t.form.lower() for t in tokens if t.tag.startswith(KIWI_KEPT_TAGS))
                 if form not in stop] for tokens in analysed]


def kiwi_workers() -> int:
    """Kiwi's threads in this process: inside a Ray task or actor, the CPUs Ray gave it (Ray sets OMP_NUM_THREADS
    from num_cpus), else every core (-1). Kiwi's own -1 counts the host's cores in every process, so several mining
    actors on one node would each start one thread per core."""
    granted = os.environ.get("OMP_NUM_THREADS", "")
    if granted.isdigit() and int(granted) > 0:
        return int(granted) if int(granted) > 1 else 0  # 0: Kiwi's single-threaded mode
    return -1 if (os.cpu_count() or 1) > 1 else 0


class BM25Index:
    """A bm25s index plus the tokenization it was built with (queries must be tokenized the same way)."""

    def __init__(self, retriever, stopwords: str | None, size: int, positions: np.ndarray | None = None,
                 tokenizer: str = "regex") -> None:
        self.retriever = retriever
        self.stopwords = stopwords
        self.size = size
        self.positions = positions  # docstore position of each indexed text; None: the same as its own
        self.tokenizer = tokenizer  # regex or kiwi (auto is resolved at build time)

    @classmethod
    def build(cls, texts: list[str], stopwords: str | None = "en", positions: np.ndarray | None = None,
              tokenizer: str = "auto") -> BM25Index:
        import bm25s

        tokenizer = resolve_tokenizer(tokenizer, texts)
        retriever = bm25s.BM25()
        if tokenizer == "regex":  # bm25s's token ids: the same terms, less memory than lists of strings
            terms = bm25s.tokenize(texts, stopwords=stopwords or [], show_progress=False)
            has_terms = bool(terms.vocab)
        else:
            terms = tokenize(texts, tokenizer, stopwords)
            has_terms = any(terms)
        if not has_terms:  # bm25s would fail on its empty vocabulary with a bare ValueError
            raise NoTerms(f"none of the {len(texts)} texts has a term BM25 can index (tokenizer {tokenizer}, "
                          f"stopwords {stopwords or 'none'}): every word is a stopword or too short")
        retriever.index(terms, show_progress=False)
        return cls(retriever, stopwords, len(texts), positions, tokenizer)

    def save(self, path: str) -> None:
        self.retriever.save(path, show_progress=False)
        if self.positions is not None:
            np.save(os.path.join(path, POSITIONS_FILE), self.positions)
        with open(os.path.join(path, PARAMS_FILE), "w") as f:
            json.dump({"stopwords": self.stopwords, "size": self.size, "tokenizer": self.tokenizer}, f)

    @classmethod
    def load(cls, path: str) -> BM25Index:
        import bm25s

        with open(os.path.join(path, PARAMS_FILE)) as f:
            params = json.load(f)
        positions_file = os.path.join(path, POSITIONS_FILE)
        positions = np.load(positions_file) if os.path.exists(positions_file) else None
        # Indexes written before the tokenizer was recorded were all cut by the regex.
        return cls(bm25s.BM25.load(path, show_progress=False), params["stopwords"], params["size"], positions,
                   params.get("tokenizer", "regex"))

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each ``(len(queries), min(k, size))``, best first; -1 where no document matches."""
        k = min(k, self.size)
        tokens = tokenize(queries, self.tokenizer, self.stopwords)
        positions, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        positions = np.asarray(positions, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        # A document that shares no term with the query scores 0: it was not retrieved, whatever its rank.
        if self.positions is not None and self.size:
            positions = self.positions[positions]
        positions[scores <= 0] = -1
        return scores, positions
