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


def test_a_key_file_in_a_folder_others_may_write_or_of_another_user_and_a_non_ascii_key_are_refused(tmp_path,
                                                                                                     monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    path = auth.write_key(shared / "api_key", auth.new_key())
    os.chmod(shared, 0o777)  # another user could put a key file of their own here
    with pytest.raises(InputError, match=r"its folder .*shared may be written by others \(mode 777\)"):
        auth.read_key_file(path)
    os.chmod(shared, 0o1777)  # sticky, as /tmp: others cannot replace what is ours
    assert auth.read_key_file(path)
    os.chmod(shared, 0o700)
    owner = os.stat(path).st_uid
    if os.getuid() == 0:  # the file given to another user
        os.chown(path, 4343, -1)
    else:  # or this process taken for another user
        monkeypatch.setattr(auth.os, "getuid", lambda: owner + 1)
    with pytest.raises(InputError, match=r"api_key: the API key file belongs to another user \(uid \d+\)"):
        auth.read_key_file(path)
    monkeypatch.undo()
    # A header is read as latin-1 and the key hashed as UTF-8: a non-ASCII key could never be sent
    monkeypatch.setenv(auth.KEY_ENV, "pässwörd-0123456789")
    with pytest.raises(InputError, match=r"\$DENSEQA_API_KEY: an API key must be printable ASCII"):
        auth.resolve_key(path)


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


def test_a_nodes_own_key_is_accepted_only_while_the_config_names_none_and_is_rotated_where_it_is_set(monkeypatch):
    """A key rotation's finish must revoke the old key, the replicas' $DENSEQA_API_KEY included; and a service
    whose only key is the nodes' (a Kubernetes secret) is rotated there, not by a list that would lock clients out."""
    from denseqa.drivers import serve as deploying
    from denseqa.serve import AuthSettings

    node_key, listed = auth.new_key(), auth.new_key()
    monkeypatch.setenv(auth.KEY_ENV, node_key)  # as on the replicas' nodes
    only_node = AuthSettings().key_check()
    assert only_node.allows(f"Bearer {node_key}")
    rotated = AuthSettings(api_key_sha256=[auth.digest(listed)]).key_check()
    assert rotated.allows(f"Bearer {listed}") and not rotated.allows(f"Bearer {node_key}")
    # a node's variable too short to be a key is refused only where it would be the key, never beside a list (a
    # rotation's new digests must reach that node's replicas)
    monkeypatch.setenv(auth.KEY_ENV, "short")
    assert AuthSettings(api_key_sha256=[auth.digest(listed)]).key_check().allows(f"Bearer {listed}")
    with pytest.raises(ValueError, match=r"needs at least 16 characters, got 5"):
        AuthSettings()
    monkeypatch.setenv(auth.KEY_ENV, node_key)
    running = {"applications": [{"name": "denseqa", "deployments": [
        {"name": "SearchAPI", "user_config": {"auth": True, "api_key_sha256": []}}]}]}
    monkeypatch.setattr(deploying, "_running_app", lambda app_name, doing: running)
    with pytest.raises(InputError, match=r"takes its key from \$DENSEQA_API_KEY on its nodes .*change the secret"):
        deploying.rotate_key("start", "/nonexistent/api_key")
