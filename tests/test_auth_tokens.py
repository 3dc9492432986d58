"""cloud/auth.py without a server: the token file, its reload, and the identity rules."""

from __future__ import annotations

import stat

import pytest

from cloud import auth


def _file(tmp_path, *pairs: tuple[str, str]):
    path = tmp_path / "tokens"
    path.write_text("# name sha256\n" + "".join(f"{n} {auth.hash_token(t)}  # {n}'s edge\n" for n, t in pairs))
    return path


def test_lookup_by_hash_and_revocation_on_reload(tmp_path):
    a, b, a2 = auth.new_token(), auth.new_token(), auth.new_token()
    path = _file(tmp_path, ("edge-a", a), ("edge-b", b), ("edge-a", a2))
    table = auth.TokenTable(path)
    assert table.lookup(a) == "edge-a" and table.lookup(a2) == "edge-a" and table.lookup(b) == "edge-b"
    assert table.lookup("") is None and table.lookup(a + "x") is None and table.lookup(auth.hash_token(a)) is None
    assert a not in path.read_text()  # only hashes are stored
    path.write_text(f"edge-a {auth.hash_token(a2)}\n")  # a and b revoked
    assert table.reload()
    assert table.lookup(a) is None and table.lookup(b) is None and table.lookup(a2) == "edge-a"


def test_a_bad_reload_keeps_the_tokens_in_force(tmp_path):
    a = auth.new_token()
    path = _file(tmp_path, ("edge-a", a))
    table = auth.TokenTable(path)
    path.write_text("edge-a not-a-hash\n")
    assert not table.reload()
    assert table.lookup(a) == "edge-a"
    path.unlink()
    assert not table.reload()
    assert table.lookup(a) == "edge-a"
    with pytest.raises(OSError):
        auth.TokenTable(path)  # at start, the error goes to the operator


@pytest.mark.parametrize("text", ["edge-a", "edge a " + "0" * 64, "-x " + "0" * 64, "a " + "g" * 64,
                                  f"a {'0' * 64}\nb {'0' * 64}"])
def test_bad_token_files_are_refused_with_the_line(text):
    with pytest.raises(ValueError, match="line"):
        auth.parse_tokens(text)


def test_identity_rules():
    table = auth.TokenTable.__new__(auth.TokenTable)
    token = auth.new_token()
    table._entries = (("edge-a", bytes.fromhex(auth.hash_token(token))),)
    tokens = auth.Authenticator(tokens=table)
    assert tokens.identify([("authorization", f"Bearer {token}")], {}) == ("edge-a", "")
    assert tokens.identify([("authorization", f"bearer {token}")], {}) == ("edge-a", "")
    assert tokens.identify([], {}) == (None, "missing")
    assert tokens.identify([("authorization", token)], {}) == (None, "malformed")
    assert tokens.identify([("authorization", f"Bearer {token}")] * 2, {}) == (None, "malformed")
    assert tokens.identify([("authorization", "Bearer nope")], {}) == (None, "invalid")
    mtls = auth.Authenticator(mtls=True)
    assert mtls.identify([], {"x509_common_name": [b"edge-b"]}) == ("edge-b", "")
    assert mtls.identify([], {}) == (None, "certificate")
    assert mtls.identify([], {"x509_common_name": [b"bad name"]}) == (None, "certificate")
    assert auth.Authenticator().identify([], {}) == (auth.ANONYMOUS, "")
    assert not auth.Authenticator().enabled and tokens.enabled and mtls.enabled


def test_token_command_appends_a_hash_and_prints_the_token_once(tmp_path, capsys):
    path = tmp_path / "tokens"
    assert auth.main_token(["edge-a", "--token-file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert auth.main_token(["edge-b", "--token-file", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()
    assert auth.TokenTable(path).lookup(token) == "edge-a"
