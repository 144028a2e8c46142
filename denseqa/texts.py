"""What denseqa asks of a text wherever one comes in: is it blank, and what is its stable hash.

Every stage reads texts (training pairs, corpus passages, evaluation questions, tuning questions, search queries)
and each must drop the same blank ones; equal texts must hash equally on every machine and in every process
(Python's ``hash`` is salted per process), whether the hash is a passage id, a split key or a duplicate mask.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def is_blank(text: str) -> bool:
    """Empty or whitespace only."""
    return not text.strip()


def non_blank(texts):
    """A pyarrow boolean mask: True where the text is present and not empty or whitespace only (nulls: False)."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0), False)


def digest64(text: str) -> bytes:
    """The 8-byte blake2b digest of a text (UTF-8): what every hash below is made of."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def text_id(text: str) -> str:
    """A stable id for a passage known only by its text: 16 hex digits of its blake2b hash."""
    return digest64(text).hex()


def split_key(question: str, seed: int) -> int:
    """A stable non-negative 63-bit hash of (seed, question), which decides the held-out split."""
    return int.from_bytes(digest64(f"{seed}\x00{question}"), "little") >> 1


def text_hashes(texts: Sequence[str]):
    """Signed 64-bit hashes of texts as an int64 tensor (B,): the duplicate-masking labels of the loss."""
    import torch

    values = [int.from_bytes(digest64(t), "little", signed=True) for t in texts]
    return torch.from_numpy(np.asarray(values, dtype=np.int64))
