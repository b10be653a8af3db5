"""Sealed messages between two parties, relayed by a coordinator that must not read them.

In hetero logistic regression the coordinator holds the Paillier secret key, so the ciphertexts
the parties pass each other ([[u_h]] from a feature party to the label party, [[d]] back) must
not reach it as they are. Each party draws an X25519 key pair for the run in its worker and
advertises the public key; a message from A to B is ChaCha20-Poly1305 under a key that
HKDF-SHA256 derives from the X25519 shared secret, the run and both names, with a fresh random
96-bit nonce, and associated data that binds the run, the protocol step, sender, receiver and
the step's position (epoch, batch). A sealed blob replayed at another step, or from another
sender, fails to open.

The coordinator relays the public keys; a coordinator that substitutes its own would be an
active attacker (the semi-honest model of FATE and of secure aggregation without a PKI assumes
it relays faithfully). Primitives from ``cryptography``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY = 32
NONCE = 12
TAG = 16
INFO = b"fednb vertical seal v1"


class SealError(ValueError):
    """A sealed message that does not open: tampered, replayed elsewhere, or not for this party."""


def new_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_text(key: X25519PrivateKey) -> str:
    """The public half, as the party advertises it (base64 of 32 bytes)."""
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def read_public(text: Any) -> X25519PublicKey:
    """A peer's advertised public key; ValueError when it is not 32 base64-encoded bytes."""
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != KEY:
        raise ValueError("a seal key is 32 bytes, base64-encoded")
    return X25519PublicKey.from_public_bytes(raw)


def _cipher(mine: X25519PrivateKey, theirs: X25519PublicKey, run: str, sender: str, receiver: str) -> ChaCha20Poly1305:
    shared = mine.exchange(theirs)
    if shared == bytes(KEY):
        raise ValueError("the peer's seal key is of small order")
    salt = json.dumps([run, sorted([sender, receiver])], separators=(",", ":")).encode()
    key = HKDF(algorithm=hashes.SHA256(), length=KEY, salt=salt, info=INFO).derive(shared)
    return ChaCha20Poly1305(key)


def _associated(run: str, sender: str, receiver: str, context: Mapping[str, Any]) -> bytes:
    return json.dumps({"run": run, "from": sender, "to": receiver, **dict(context)}, sort_keys=True,
                      separators=(",", ":")).encode()


def seal(mine: X25519PrivateKey, theirs: X25519PublicKey, data: bytes, *, run: str, sender: str, receiver: str,
         context: Mapping[str, Any]) -> bytes:
    """``data`` for ``receiver`` only: nonce ‖ ciphertext ‖ tag."""
    nonce = os.urandom(NONCE)
    return nonce + _cipher(mine, theirs, run, sender, receiver).encrypt(
        nonce, data, _associated(run, sender, receiver, context))


def open_sealed(mine: X25519PrivateKey, theirs: X25519PublicKey, blob: bytes, *, run: str, sender: str,
                receiver: str, context: Mapping[str, Any]) -> bytes:
    """The data ``sender`` sealed for this party at ``context``; SealError otherwise."""
    if len(blob) < NONCE + TAG:
        raise SealError(f"a sealed message from {sender} is too short")
    try:
        return _cipher(mine, theirs, run, sender, receiver).decrypt(
            blob[:NONCE], blob[NONCE:], _associated(run, sender, receiver, context))
    except InvalidTag:
        raise SealError(f"a sealed message from {sender} does not open here (tampered, or sealed for another "
                        "step or party)") from None
