"""The crypto store at rest: its pickle key, re-keying from nio's default key (also after a
crash halfway), and private modes whatever the umask. Real nio stores and vodozemac keys;
tests/test_matrix_e2ee.py re-keys the store of a bot that ran against Synapse."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from nio.crypto import OlmAccount, OutboundGroupSession
from nio.crypto.sessions import InboundGroupSession, OutboundSession
from nio.store import DefaultStore
from pydantic import SecretStr

from matrixjobs.matrix.crypto_store import (
    DEFAULT_PICKLE_KEY,
    CryptoStoreError,
    PickleKeyError,
    PrivateStore,
    load_pickle_key,
)

USER, DEVICE, ROOM = "@bot:example.org", "BOTDEVICE", "!room:example.org"
KEY = "a-real-secret-pickle-key-0123456789"


@pytest.fixture(autouse=True)
def shell_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


class OldStore:
    """A crypto store as nio pickled it before: an account, an Olm session and an inbound
    Megolm session, plus a message encrypted in that Megolm session."""

    def __init__(self, directory: Path, key: str = DEFAULT_PICKLE_KEY) -> None:
        store = DefaultStore(USER, DEVICE, str(directory), key)
        self.account = OlmAccount()
        store.save_account(self.account)
        peer = OlmAccount()
        peer.generate_one_time_keys(1)
        one_time_key = next(iter(peer.one_time_keys["curve25519"].values()))
        self.olm = OutboundSession(self.account, peer.identity_keys["curve25519"],
                                   one_time_key)
        store.save_session(peer.identity_keys["curve25519"], self.olm)
        outbound = OutboundGroupSession()
        outbound.shared = True
        self.megolm = InboundGroupSession(outbound.session_key, "ed25519-of-sender",
                                          "curve-of-sender", ROOM)
        self.ciphertext = outbound.encrypt("!build quick")
        store.save_inbound_group_session(self.megolm)
        store.database.close()
        self.path = directory / f"{USER}_{DEVICE}.db"


def open_with(directory: Path, key: str) -> DefaultStore:
    return DefaultStore(USER, DEVICE, str(directory), key)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_store_pickled_with_the_default_key_is_rekeyed_keeping_every_key(tmp_path, caplog):
    old = OldStore(tmp_path)
    with caplog.at_level(logging.WARNING):
        store = PrivateStore(USER, DEVICE, str(tmp_path), KEY)
    assert "re-keyed the crypto store" in caplog.text
    assert "(1 account, 1 Olm and 1 Megolm sessions)" in caplog.text
    assert KEY not in caplog.text

    account = store.load_account()
    assert account.identity_keys == old.account.identity_keys
    assert [s.id for s in store.load_sessions()] == [old.olm.id]
    megolm = store.load_inbound_group_sessions().get(ROOM, "curve-of-sender", old.megolm.id)
    assert megolm is not None
    assert megolm.decrypt(old.ciphertext)[0] == "!build quick"

    with pytest.raises(ValueError):
        open_with(tmp_path, DEFAULT_PICKLE_KEY).load_account()


def test_rekeying_happens_once(tmp_path, caplog):
    OldStore(tmp_path)
    PrivateStore(USER, DEVICE, str(tmp_path), KEY).database.close()
    before = digest(tmp_path / f"{USER}_{DEVICE}.db")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        PrivateStore(USER, DEVICE, str(tmp_path), KEY).database.close()
    assert "re-keyed" not in caplog.text
    assert digest(tmp_path / f"{USER}_{DEVICE}.db") == before


def test_a_store_that_opens_with_neither_key_is_refused_and_left_as_it_was(tmp_path):
    old = OldStore(tmp_path, key="the-key-it-was-made-with-0123")
    before = digest(old.path)
    with pytest.raises(PickleKeyError) as caught:
        PrivateStore(USER, DEVICE, str(tmp_path), KEY)
    assert str(old.path) in str(caught.value)
    assert KEY not in str(caught.value) and "the-key-it-was" not in str(caught.value)
    assert digest(old.path) == before
    account = open_with(tmp_path, "the-key-it-was-made-with-0123").load_account()
    assert account.identity_keys == old.account.identity_keys


CRASH = """
import os, sys
from pathlib import Path
from matrixjobs.matrix import crypto_store

def die(*args, **kwargs):
    os._exit(9)  # the account and Olm sessions are re-keyed in the transaction by now

crypto_store.InboundGroupSession.from_pickle = die
crypto_store.rekey(Path(sys.argv[1]), sys.argv[2])
"""


def test_a_crash_halfway_through_rekeying_leaves_the_store_on_the_old_key(tmp_path):
    old = OldStore(tmp_path)
    crashed = subprocess.run([sys.executable, "-c", CRASH, str(old.path), KEY], check=False)
    assert crashed.returncode == 9

    store = open_with(tmp_path, DEFAULT_PICKLE_KEY)
    assert store.load_account().identity_keys == old.account.identity_keys
    assert store.load_inbound_group_sessions().get(ROOM, "curve-of-sender", old.megolm.id)
    store.database.close()
    # And the next start re-keys it in full.
    store = PrivateStore(USER, DEVICE, str(tmp_path), KEY)
    assert store.load_account().identity_keys == old.account.identity_keys
    assert [s.id for s in store.load_sessions()] == [old.olm.id]


def test_a_new_store_is_created_private(tmp_path):
    store = PrivateStore(USER, DEVICE, str(tmp_path), KEY)
    store.save_account(OlmAccount())
    store.database.close()
    files = list(tmp_path.iterdir())
    assert files, "nio wrote its database"
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {
        f.name: 0o600 for f in files}


def test_the_key_file_is_made_once_private_and_reused(tmp_path, caplog):
    key_file = tmp_path / "matrixjobs.pickle-key"
    with caplog.at_level(logging.WARNING):
        first = load_pickle_key(None, key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(first.value) >= 40 and first.source == f"the key file {key_file}"
    assert f"created the crypto store's pickle key in {key_file}" in caplog.text
    assert first.value not in caplog.text
    assert load_pickle_key(None, key_file) == first
    assert [p.name for p in tmp_path.iterdir()] == [key_file.name], "no temp file left"


def test_the_environment_wins_over_the_key_file(tmp_path):
    key_file = tmp_path / "matrixjobs.pickle-key"
    load_pickle_key(None, key_file)
    chosen = load_pickle_key(SecretStr(KEY), key_file)
    assert (chosen.value, chosen.source) == (KEY, "MATRIXJOBS_PICKLE_KEY")


def test_an_empty_key_file_is_an_error_not_a_new_key(tmp_path):
    key_file = tmp_path / "matrixjobs.pickle-key"
    key_file.write_text("\n")
    with pytest.raises(CryptoStoreError, match="is empty or damaged"):
        load_pickle_key(None, key_file)
    assert key_file.read_text() == "\n"


def test_a_key_file_readable_by_others_is_tightened(tmp_path):
    key_file = tmp_path / "matrixjobs.pickle-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    assert load_pickle_key(None, key_file).value == KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
