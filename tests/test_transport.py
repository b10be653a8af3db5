"""Keys, allow-lists and the endpoint security rules (no party needed)."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from fednb.errors import KeyFileError
from fednb.transport import (AllowList, check_security, generate, key_paths, load_keypair, load_public_key,
                             read_authorized_keys, write_keypair)


def test_keypair_files_have_safe_modes_and_load_back(tmp_path):
    keypair = write_keypair(tmp_path / "party")
    public, secret = key_paths(tmp_path / "party")
    assert public.name == "party.key" and secret.name == "party.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert load_keypair(tmp_path / "party") == keypair
    assert load_public_key(public) == keypair.public
    assert load_public_key(str(tmp_path / "party")) == keypair.public  # base path works too
    assert load_public_key(keypair.public.decode()) == keypair.public
    # pyzmq's own reader agrees: the files are in its certificate format
    assert zmq.auth.load_certificate(secret) == (keypair.public, keypair.secret)
    assert "hidden" in repr(keypair) and keypair.secret.decode() not in repr(keypair)


def test_existing_keys_are_not_overwritten(tmp_path):
    write_keypair(tmp_path / "k")
    with pytest.raises(KeyFileError, match="exists"):
        write_keypair(tmp_path / "k")
    write_keypair(tmp_path / "k", overwrite=True)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secret_readable_by_others_is_refused(tmp_path, mode):
    write_keypair(tmp_path / "k")
    os.chmod(key_paths(tmp_path / "k")[1], mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_keypair(tmp_path / "k")


def test_missing_and_malformed_keys(tmp_path):
    with pytest.raises(KeyFileError, match="fednb keys new"):
        load_keypair(tmp_path / "nothing")
    with pytest.raises(KeyFileError, match="neither"):
        load_public_key(tmp_path / "nothing.key")
    with pytest.raises(KeyFileError, match="Z85"):
        load_public_key("x" * 39 + "\"")
    (tmp_path / "bad.key").write_text("curve\n    public-key = \"short\"\n")
    with pytest.raises(KeyFileError):
        load_public_key(tmp_path / "bad.key")


def test_authorized_keys_file_and_directory(tmp_path):
    a, b = generate(), generate()
    listing = tmp_path / "authorized_keys"
    listing.write_text(f"# coordinators\n{a.public.decode()} alice@lab\n\n{b.public.decode()}\n")
    keys = read_authorized_keys(listing)
    assert keys == {a.public: "alice@lab", b.public: b.public.decode()[:8]}
    directory = tmp_path / "keys"
    directory.mkdir()
    write_keypair(directory / "alice", a)
    os.remove(directory / "alice.key_secret")
    assert read_authorized_keys(directory) == {a.public: "alice"}


def test_authorized_keys_fail_closed(tmp_path):
    with pytest.raises(KeyFileError, match="do not exist"):
        read_authorized_keys(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text("not-a-key comment\n")
    with pytest.raises(KeyFileError, match="bad:1"):
        read_authorized_keys(bad)
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    allow = AllowList(empty)
    assert not allow.callback("fednb", generate().public)


def test_allow_list_reloads_and_reports_revoked_keys(tmp_path):
    a, b = generate(), generate()
    listing = tmp_path / "authorized_keys"
    listing.write_text(f"{a.public.decode()} a\n{b.public.decode()} b\n")
    allow = AllowList(listing)
    assert allow.callback("fednb", a.public) and allow.callback("fednb", b.public)
    assert not allow.callback("other-domain", a.public)
    listing.write_text(f"{a.public.decode()} a\n")
    os.utime(listing, (1, 1))  # a different mtime even within one clock tick
    assert allow.refresh() == {b.public}
    assert not allow.callback("fednb", b.public)
    listing.unlink()
    os.mkdir(listing)  # unreadable as a list of keys now: nobody gets in
    allow.refresh()
    assert not allow.callback("fednb", a.public)


def test_security_rules_for_endpoints(tmp_path):
    with pytest.raises(ValueError, match="always use CURVE"):
        check_security("tcp://127.0.0.1:5555", secure=False)
    check_security("tcp://127.0.0.1:5555", secure=True)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    check_security(f"ipc://{private}/p.sock", secure=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(ValueError, match="private directory"):
        check_security(f"ipc://{shared}/p.sock", secure=False)
    check_security(f"ipc://{shared}/p.sock", secure=True)
    for bad in ["inproc://x", "tcp:/x", "udp://1.2.3.4:5", "tcp://"]:
        with pytest.raises(ValueError, match="endpoint"):
            check_security(bad, secure=True)


def test_authorized_keys_accept_a_pasted_key_file_and_refuse_a_secret(tmp_path):
    """The format `fednb party --help` documents: KEY [LABEL] lines, comments, a .key file's content pasted."""
    a, b, c = generate(), generate(), generate()
    write_keypair(tmp_path / "bob", b)
    pasted = key_paths(tmp_path / "bob")[0].read_text()
    listing = tmp_path / "authorized_keys"
    listing.write_text(f"# coordinators\n{a.public.decode()}\talice@lab\n\n{pasted}\n#{c.public.decode()} carol\n")
    assert read_authorized_keys(listing) == {a.public: "alice@lab", b.public: b.public.decode()[:8]}
    listing.write_text(key_paths(tmp_path / "bob")[1].read_text())  # the secret file, pasted by mistake
    with pytest.raises(KeyFileError, match=r"authorized_keys:\d+: a secret key; list public keys only"):
        read_authorized_keys(listing)
    listing.write_text('curve\n    public-key = "short"\n')
    with pytest.raises(KeyFileError, match="authorized_keys:2: not a public key.*one coordinator per line"):
        read_authorized_keys(listing)


def test_a_missing_key_file_names_the_keys_beside_it(tmp_path):
    """A typo points at the nearest key files; `fednb keys new PATH` only where making one is right."""
    write_keypair(tmp_path / "keys" / "clinic-a")
    write_keypair(tmp_path / "keys" / "coordinator")
    (tmp_path / "empty").mkdir()
    for path, match in [("keys/clinci-a", r"clinci-a.key_secret does not exist; did you mean .*keys/clinic-a\?$"),
                        ("keys/zzz", "the .key_secret files in .*keys: clinic-a, coordinator$"),
                        ("nokeys/clinic-a", "nor does the directory"),
                        ("empty/party", r"to make a keypair there: fednb keys new .*empty/party$")]:
        with pytest.raises(KeyFileError, match=match) as missing:
            load_keypair(tmp_path / path)
        assert ("keys new" in str(missing.value)) == (path == "empty/party")
    os.remove(key_paths(tmp_path / "keys" / "coordinator")[1])
    with pytest.raises(KeyFileError, match="is a public key alone"):
        load_keypair(tmp_path / "keys" / "coordinator")
    with pytest.raises(KeyFileError, match="did you mean .*keys/clinic-a") as public:
        load_public_key(tmp_path / "keys" / "clinic")
    assert "keys new" not in str(public.value)  # a peer's key is the peer's to make
