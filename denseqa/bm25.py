"""BM25 over the corpus texts, with ``bm25s`` (Lù, 2024, "BM25S: Orders of magnitude faster lexical search").

The lexical baseline every dense retriever should be compared with (Karpukhin et al., 2020, "Dense Passage
Retrieval", Table 2), and half of the hybrid search. Documents are addressed by their position in the corpus
list, the same positions as the FAISS index and the docstore; after a live update, whose docstore keeps the rows
of deleted passages, the index holds the live texts only (BM25's statistics are over the corpus, so a deleted text
must not count) with each one's docstore position beside it.
"""

from __future__ import annotations

import json
import os

import numpy as np

PARAMS_FILE = "denseqa_bm25.json"
POSITIONS_FILE = "denseqa_positions.npy"


class BM25Index:
    """A bm25s index plus the tokenization it was built with (queries must be tokenized the same way)."""

    def __init__(self, retriever, stopwords: str | None, size: int, positions: np.ndarray | None = None) -> None:
        self.retriever = retriever
        self.stopwords = stopwords
        self.size = size
        self.positions = positions  # docstore position of each indexed text; None: the same as its own

    @classmethod
    def build(cls, texts: list[str], stopwords: str | None = "en", positions: np.ndarray | None = None) -> BM25Index:
        import bm25s

        tokens = bm25s.tokenize(texts, stopwords=stopwords or [], show_progress=False)
        retriever = bm25s.BM25()
        retriever.index(tokens, show_progress=False)
        return cls(retriever, stopwords, len(texts), positions)

    def save(self, path: str) -> None:
        self.retriever.save(path, show_progress=False)
        if self.positions is not None:
            np.save(os.path.join(path, POSITIONS_FILE), self.positions)
        with open(os.path.join(path, PARAMS_FILE), "w") as f:
            json.dump({"stopwords": self.stopwords, "size": self.size}, f)

    @classmethod
    def load(cls, path: str) -> BM25Index:
        import bm25s

        with open(os.path.join(path, PARAMS_FILE)) as f:
            params = json.load(f)
        positions_file = os.path.join(path, POSITIONS_FILE)
        positions = np.load(positions_file) if os.path.exists(positions_file) else None
        return cls(bm25s.BM25.load(path, show_progress=False), params["stopwords"], params["size"], positions)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each ``(len(queries), min(k, size))``, best first; -1 where no document matches."""
        import bm25s

        k = min(k, self.size)
        tokens = bm25s.tokenize(queries, stopwords=self.stopwords or [], return_ids=False, show_progress=False)
        positions, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        positions = np.asarray(positions, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        # A document that shares no term with the query scores 0: it was not retrieved, whatever its rank.
        if self.positions is not None and self.size:
            positions = self.positions[positions]
        positions[scores <= 0] = -1
        return scores, positions
