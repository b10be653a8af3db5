"""The sealed party-to-party messages and the fixed-base Paillier obfuscators of vertical learning."""

from __future__ import annotations

import numpy as np
import pytest

from fednb.privacy import djn, paillier, seal


def test_a_sealed_message_opens_only_for_its_receiver_at_its_step():
    a, b, c = seal.new_key(), seal.new_key(), seal.new_key()
    pa, pb, pc = (seal.read_public(seal.public_text(k)) for k in (a, b, c))
    where = {"step": "forward", "model": "m", "epoch": 0, "batch": 1}
    blob = seal.seal(a, pb, b"ciphertexts", run="r" * 32, sender="partner", receiver="bank", context=where)
    assert seal.open_sealed(b, pa, blob, run="r" * 32, sender="partner", receiver="bank", context=where) == b"ciphertexts"
    assert b"ciphertexts" not in blob and len(blob) == len(b"ciphertexts") + seal.NONCE + seal.TAG
    with pytest.raises(seal.SealError):  # another batch: a replay at the wrong step
        seal.open_sealed(b, pa, blob, run="r" * 32, sender="partner", receiver="bank", context={**where, "batch": 2})
    with pytest.raises(seal.SealError):  # another party (the coordinator with a key of its own) cannot open it
        seal.open_sealed(c, pa, blob, run="r" * 32, sender="partner", receiver="bank", context=where)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(seal.SealError):
        seal.open_sealed(b, pa, bytes(tampered), run="r" * 32, sender="partner", receiver="bank", context=where)
    for bad in ("", "AAAA", 5, "A" * 44):
        with pytest.raises(ValueError):
            seal.read_public(bad)
    assert pc is not None


def test_keys_are_blum_and_fixed_base_obfuscators_encrypt_correctly_and_differ():
    public, private = djn.generate_keypair(1024)
    assert public.n.bit_length() == 1024 and private.p % 4 == 3 and private.q % 4 == 3
    base = djn.FixedBase(public)
    masks = base.draw(200)
    assert len(set(masks)) == 200 and all(0 < m < public.nsquare for m in masks)
    values = np.linspace(-3, 3, 200)
    vector = paillier.encrypt(public, values, 20, masks)
    assert np.allclose(paillier.decrypt(private, vector), values, atol=1e-6)
    # each obfuscator is an n-th residue: decrypting Enc(0) with it gives 0
    zero = paillier.encrypt(public, np.zeros(3), 20, base.draw(3))
    assert np.all(paillier.decrypt(private, zero) == 0)
    # two parties on one key draw from different bases
    assert djn.FixedBase(public).draw(1) != base.draw(1)


def test_matrix_vector_products_under_encryption_match_the_floats():
    public, private = djn.generate_keypair(1024)
    config = paillier.PaillierConfig(key_bits=1024)
    rng = np.random.default_rng(3)
    v = rng.normal(size=40)
    m = rng.normal(size=(7, 40))
    vector = paillier.encrypt(public, v, config.precision, djn.FixedBase(public).draw(40))
    product = paillier.matvec(m, vector, config.multiplier_bits, config)
    expected = np.rint(m * 2.0**config.multiplier_bits) / 2.0**config.multiplier_bits @ v
    assert np.allclose(paillier.decrypt(private, product), expected, atol=1e-6)
