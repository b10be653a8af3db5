"""ECDH-PSI (fednb.privacy.psi): the properties of the protocol, with no sockets.

Both parties learn exactly their own rows of the intersection, in one order; the coordinator the
size; no message holds an id or an unblinded hash point; bad ids and bad points are refused.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from nacl.bindings import crypto_core_ed25519_add, crypto_core_ed25519_from_uniform

from fednb.privacy import psi

GROUPS = ["ed25519", "x25519"]


def run(ids_a, ids_b, config):
    """The three stages as the round loop runs them, keeping every message that crosses the coordinator."""
    state_a, blinded_a = psi.blind(ids_a, config)
    state_b, blinded_b = psi.blind(ids_b, config)
    twice_a = psi.double_blind(state_b, blinded_a)
    twice_b = psi.double_blind(state_a, blinded_b)
    result_a = psi.intersect(state_a, twice_a, twice_b)
    result_b = psi.intersect(state_b, twice_b, twice_a)
    return result_a, result_b, psi.intersection_size(twice_a, twice_b), [blinded_a, blinded_b, twice_a, twice_b]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("size_a, size_b, common", [
    (0, 0, 0), (0, 7, 0), (7, 0, 0), (1, 1, 1), (1, 1, 0), (25, 25, 25), (40, 15, 15), (30, 50, 10), (60, 60, 0),
])
def test_intersection_is_exact_and_in_one_order(group, size_a, size_b, common):
    rng = random.Random(size_a * 1000 + size_b * 10 + common)
    pool = rng.sample(range(10**9), size_a + size_b - common)
    shared = pool[:common]
    ids_a = shared + pool[common:size_a]
    ids_b = shared + pool[size_a:]
    rng.shuffle(ids_a)
    rng.shuffle(ids_b)
    ids_b = [f"{i}" for i in ids_b]  # strings at one party, integers at the other: canonical forms meet
    result_a, result_b, size, _ = run(ids_a, ids_b, psi.PSIConfig(group=group))
    assert result_a.size == result_b.size == size == common
    assert sorted(ids_a[i] for i in result_a.rows) == sorted(shared)
    # one order: row k of A's aligned table is row k of B's
    assert [ids_a[i] for i in result_a.rows] == [int(ids_b[j]) for j in result_b.rows]


def test_the_order_is_not_the_parties_row_order():
    ids = list(range(300))
    result_a, result_b, _, _ = run(ids, ids[::-1], psi.PSIConfig())
    assert [ids[i] for i in result_a.rows] == [ids[::-1][j] for j in result_b.rows]
    assert list(result_a.rows) != sorted(result_a.rows)
    # the agreed order is the ids' canonical order: the same in every run, whatever the secrets
    again_a, _, _, _ = run(ids, ids[::-1], psi.PSIConfig())
    assert list(again_a.rows) == list(result_a.rows) == sorted(ids, key=lambda i: str(i).encode())


def test_a_process_pool_gives_the_same_intersection():
    config = psi.PSIConfig(group="x25519", workers=2, serial_below=16, chunk=64)
    ids_a, ids_b = [f"c{i}" for i in range(400)], [f"c{i}" for i in range(200, 500)]
    with psi.open_pool(config) as pool:
        result_a, result_b = psi.align(ids_a, ids_b, config, pool=pool)
    assert sorted(ids_a[i] for i in result_a.rows) == sorted(f"c{i}" for i in range(200, 400))
    assert [ids_a[i] for i in result_a.rows] == [ids_b[j] for j in result_b.rows]


def hash_point(id_: bytes) -> bytes:
    digest = psi._digest(id_)
    return crypto_core_ed25519_add(crypto_core_ed25519_from_uniform(digest[:32]),
                                   crypto_core_ed25519_from_uniform(digest[32:]))


def test_messages_hold_no_id_and_no_unblinded_point():
    ids_a = [f"customer-{i:06d}" for i in range(40)]
    ids_b = [f"customer-{i:06d}" for i in range(20, 70)]
    *_, messages = run(ids_a, ids_b, psi.PSIConfig())
    frames = b"".join(m.tobytes() for m in messages)
    for message in messages:
        assert message.dtype == np.uint8 and message.shape[1] == 32
    hashes = {hash_point(i.encode()) for i in ids_a + ids_b}
    points = {frames[k:k + 32] for k in range(0, len(frames), 32)}
    assert not hashes & points
    for id_ in ids_a + ids_b:
        assert id_.encode() not in frames
        assert psi._curve_point(psi._digest(id_.encode())) not in frames  # the x25519 point of an id, too
    # a second run blinds the same ids to other points: runs cannot be linked
    *_, again = run(ids_a, ids_b, psi.PSIConfig())
    assert not points & {b"".join(m.tobytes() for m in again)[k:k + 32] for k in range(0, len(frames), 32)}


@pytest.mark.parametrize("ids, message", [
    ([1, 2, 2], "duplicate id 2"),
    ([7, "7"], "duplicate id '7'"),
    (["a", None], "row 1 is missing"),
    (["a", float("nan")], "row 1 is missing"),
    (["a", ""], "row 1 is missing"),
    ([1, 2.5], "float"),
    ([True], "boolean"),
])
def test_bad_ids_are_refused_with_the_row(ids, message):
    with pytest.raises(ValueError, match=message):
        psi.blind(ids)


def test_numpy_ids_are_canonical():
    assert psi.canonical_ids(np.array([3, 4])) == [b"3", b"4"]
    assert psi.canonical_ids(np.array(["x", "y"])) == [b"x", b"y"]


@pytest.mark.parametrize("group", GROUPS)
def test_received_points_are_checked(group):
    state, _ = psi.blind(["a", "b"], psi.PSIConfig(group=group))
    with pytest.raises(ValueError, match="uint8 array"):
        psi.double_blind(state, np.zeros((2, 31), dtype=np.uint8))
    with pytest.raises(ValueError, match="repeat"):
        psi.double_blind(state, np.ones((2, 32), dtype=np.uint8))
    # the identity and other small-order points reveal something of the scalar: refused
    small = np.zeros((1, 32), dtype=np.uint8)
    small[0, 0] = 1
    with pytest.raises(ValueError, match="not a valid"):
        psi.double_blind(state, small if group == "ed25519" else np.zeros((1, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="double-blinded points back"):
        psi.intersect(state, np.zeros((3, 32), dtype=np.uint8), np.zeros((0, 32), dtype=np.uint8))


P = 2**255 - 19


def on_curve(u: int) -> bool:
    """Euler's criterion, independently of the module: u³ + 486662·u² + u is a nonzero square mod p."""
    return pow((u**3 + 486662 * u**2 + u) % P, (P - 1) // 2, P) == 1


def test_x25519_hashes_every_id_onto_the_curve_and_blinding_keeps_it_there():
    ids = [f"customer-{i}".encode() for i in range(200)]
    points = [psi._curve_point(psi._digest(id_)) for id_ in ids]
    assert all(on_curve(int.from_bytes(u, "little")) for u in points)
    # try-and-increment really tries: about half of the first candidates lie on the twist
    first = [int.from_bytes(psi._digest(id_), "little") % P for id_ in ids]
    assert 60 < sum(map(on_curve, first)) < 140
    assert points == [psi._curve_point(psi._digest(id_)) for id_ in ids]  # deterministic
    # no blinded point lies on the twist: which of the two a point is on says nothing of its id
    _, blinded = psi.blind([i.decode() for i in ids], psi.PSIConfig(group="x25519"))
    assert all(on_curve(int.from_bytes(row.tobytes(), "little")) for row in blinded)


def test_x25519_refuses_twist_non_canonical_and_small_order_points():
    state, _ = psi.blind(["a", "b"], psi.PSIConfig(group="x25519"))
    twist = next(u for u in range(2, 100) if not on_curve(u))
    order_8 = 325606250916557431795983626356110631294008115727848805560023387167927233504
    for u, message in [(twist, "of the curve"), (P + 2, "of the curve"), (2**255 + 9, "of the curve"),
                       (1, "of prime order"), (order_8, "of prime order")]:
        point = np.frombuffer(u.to_bytes(32, "little"), dtype=np.uint8).reshape(1, 32)
        with pytest.raises(ValueError, match=f"received point 0 is not a valid x25519 point {message}"):
            psi.double_blind(state, point)


def test_config_is_checked():
    with pytest.raises(ValueError, match="group"):
        psi.PSIConfig(group="p256")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers"):
        psi.PSIConfig(workers=0)
