"""The service's API keys (denseqa.auth): where a key comes from, how it is stored, how a request's key is checked."""

from __future__ import annotations

import os
import stat

import pytest

from denseqa import auth
from denseqa.errors import InputError


def test_a_key_is_made_once_into_a_file_only_its_owner_reads(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.KEY_ENV, raising=False)
    path = tmp_path / "denseqa" / "api_key"
    key, source = auth.resolve_key(path)
    assert source == str(path) and len(key) >= 43
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert auth.resolve_key(path) == (key, str(path))  # the same key the next time
    assert [p.name for p in path.parent.iterdir()] == ["api_key"]  # no staging file left behind
    assert auth.resolve_key(tmp_path / "other")[0] != key  # random, not derived from anything


def test_the_environment_variable_wins_and_bad_keys_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "api_key"
    monkeypatch.setenv(auth.KEY_ENV, "  from-a-kubernetes-secret-0123  ")
    assert auth.resolve_key(path) == ("from-a-kubernetes-secret-0123", "$DENSEQA_API_KEY")
    assert not path.exists()  # nothing is written when the key comes from the environment
    monkeypatch.setenv(auth.KEY_ENV, "short")
    with pytest.raises(InputError, match=r"\$DENSEQA_API_KEY: an API key needs at least 16 characters, got 5"):
        auth.resolve_key(path)
    monkeypatch.delenv(auth.KEY_ENV)
    with pytest.raises(InputError, match="no API key file"):
        auth.resolve_key(path, create=False)


def test_a_key_file_others_may_read_is_refused(tmp_path):
    path = auth.write_key(tmp_path / "api_key", auth.new_key())
    os.chmod(path, 0o644)
    with pytest.raises(InputError, match=r"may be read by others \(mode 644\); run `chmod 600 .*api_key`"):
        auth.read_key_file(path)


def test_key_check_accepts_each_accepted_key_as_a_bearer_token_only():
    old, new = auth.new_key(), auth.new_key()
    check = auth.KeyCheck([auth.digest(new), auth.digest(old).upper()])  # digests in any case
    for key in (old, new):
        assert check.allows(f"Bearer {key}") and check.allows(f"bearer {key}")
    for header in (None, "", "Bearer", f"Basic {new}", new, f"Bearer {new}x", f"Bearer {auth.new_key()}",
                   f"Bearer {auth.digest(new)}"):  # the digest itself is not a key
        assert not check.allows(header), header
    assert auth.KeyCheck([], open=True).allows(None)
    assert not auth.KeyCheck([]).allows(f"Bearer {new}")


def test_curl_lines_pass_the_key_by_reference():
    assert auth.curl_header("/home/u/.k") == ' -H "Authorization: Bearer $(cat /home/u/.k)"'
    assert auth.curl_header("$DENSEQA_API_KEY") == ' -H "Authorization: Bearer $DENSEQA_API_KEY"'
    assert auth.curl_header(None) == ""
