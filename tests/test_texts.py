"""The one blank-text rule and the stable text hashes every stage shares."""

from __future__ import annotations

import pyarrow as pa

from denseqa.texts import is_blank, non_blank, split_key, text_hashes, text_id


def test_blank_means_null_empty_or_whitespace_only_in_python_and_in_arrow():
    texts = ["a", "", "  \t\n", None, " b ", "\u3000"]  # U+3000: the ideographic space of CJK text
    assert non_blank(pa.array(texts, pa.string())).to_pylist() == [True, False, False, False, True, False]
    assert [is_blank(t) for t in texts if t is not None] == [False, True, True, False, True]


def test_hashes_are_pinned_so_ids_and_splits_of_existing_outputs_stay_valid():
    # Values of the blake2b-64 hashes that indexes (passage ids) and held-out splits already written rely on
    assert text_id("질문 one") == "2af13e0d5519d6d4"
    assert split_key("질문 one", 7) == 8778013454320426791
    assert int(text_hashes(["질문 one"])[0]) == -3110270639567605462
    assert text_hashes(["a", "b", "a"]).tolist()[0] == text_hashes(["a"]).tolist()[0]
