"""Secure aggregation as the papers state it (Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020).

Pure: every role runs in this process and the messages are handed over by hand, so each test
can drop, alter or forge any message at any stage.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from fednb.privacy import (
    Quantizer,
    RoundSetup,
    SecAggAbort,
    SecAggConfig,
    SecAggCoordinator,
    SecAggMessageError,
    SecAggParty,
    combine,
    split,
)
from fednb.privacy import graph, masking, stream
from fednb.privacy.noise import SecureUniform

FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = hashlib.sha256(b"global model").digest()


@dataclass
class Trace:
    """Everything one in-memory round did: the roles, the inputs, what each stage carried."""

    coordinator: SecAggCoordinator
    parties: dict[str, SecAggParty]
    inputs: dict[str, tuple[np.ndarray, int]]
    messages: list[Any] = field(default_factory=list)
    revealed: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    summed: set[str] = field(default_factory=set)


def names(n: int) -> list[str]:
    return [f"party-{i}" for i in range(n)]


def run_round(n: int, config: SecAggConfig, drops: tuple[set[str], ...] = (set(), set(), set(), set()), *,
              dimension: int = 8, seed: int = 0, hashes: dict[str, bytes] | None = None,
              trace: Trace | None = None, scale: float = 0.1) -> Trace:
    """Run one round in memory; ``drops[i]`` vanish before answering stage i."""
    rng = np.random.default_rng(seed)
    roster = names(n)
    coordinator = SecAggCoordinator(config, run="run-1", round=3, parties=roster, dimension=dimension)
    setup = RoundSetup.from_dict(coordinator.advertise_keys_request())
    parties = {p: SecAggParty(p, setup, rng=np.random.default_rng([seed, i])) for i, p in enumerate(roster)}
    inputs = {p: (rng.normal(size=dimension) * scale, int(rng.integers(1, 50))) for p in roster}
    if trace is None:
        trace = Trace(coordinator, parties, inputs)
    else:
        trace.coordinator, trace.parties, trace.inputs = coordinator, parties, inputs
    alive = set(roster) - drops[0]
    for p in sorted(alive):
        reply = parties[p].advertise_keys()
        trace.messages.append(reply)
        coordinator.receive_keys(p, reply)
    request = coordinator.share_keys_request()
    alive &= set(coordinator.advertised)
    alive -= drops[1]
    for p in sorted(alive):
        reply = parties[p].share_keys(request, (hashes or {}).get(p, MODEL))
        trace.messages.append(reply)
        coordinator.receive_shares(p, reply)
    requests = coordinator.masked_input_requests()
    trace.messages.extend(requests.values())
    alive -= drops[2]
    for p in sorted(alive):
        x, examples = inputs[p]
        coordinator.receive_masked_input(p, parties[p].masked_input(requests[p], x, examples))
    trace.summed = set(coordinator.masked)
    unmasking = coordinator.unmask_request()
    alive -= drops[3]
    for p in sorted(alive):
        reply = parties[p].unmask(unmasking)
        trace.revealed[p] = reply
        trace.messages.append(reply)
        coordinator.receive_unmask(p, reply)
    coordinator.unmask_sum()
    return trace


def quantized_sum(trace: Trace, config: SecAggConfig, seed: int) -> np.ndarray:
    """The sum mod 2^bits of the quantized inputs of the parties in the sum, computed in the clear."""
    quantizer = Quantizer(float(config.clip), config.max_examples, len(trace.coordinator.advertised), config.bits)
    total = np.zeros(trace.coordinator.setup.dimension + 1, dtype=np.uint64)
    for i, p in enumerate(names(len(trace.parties))):
        if p in trace.summed:
            x, examples = trace.inputs[p]
            total += quantizer.quantize(x, examples, np.random.default_rng([seed, i])).astype(np.uint64)
    return total & np.uint64(quantizer.modulus_mask)


def assert_never_both(trace: Trace) -> None:
    seeds = {owner for reply in trace.revealed.values() for owner in reply["self_mask_shares"]}
    keys = {owner for reply in trace.revealed.values() for owner in reply["masking_key_shares"]}
    assert not seeds & keys


def must_abort(trace: Trace, n: int, config: SecAggConfig, drops: tuple[set[str], ...]) -> bool:
    """Whether the paper says this round cannot finish: fewer than t parties, or a needed secret short of t holders."""
    invited = set(names(n))
    u1 = invited - drops[0]
    if len(u1) < config.plan(n)[1]:
        return True
    roster = trace.coordinator._roster
    assert roster is not None
    t = roster.threshold
    u2 = u1 - drops[1]
    u3 = u2 - drops[2]
    u4 = u3 - drops[3]
    if min(len(u2), len(u3), len(u4)) < t or min(len(u1), len(u2), len(u3)) < 3:  # 3: the parties' min_parties
        return True
    for party in u2:
        if party in u3 or roster.neighbours[party] & u3:
            if len(roster.holders(party) & u4) < t:
                return True
    return False


@st.composite
def rounds(draw: st.DrawFn) -> tuple[int, SecAggConfig, tuple[set[str], ...], int]:
    n = draw(st.integers(4, 14))
    neighbours = draw(st.sampled_from([None, 2, 4]))
    config = SecAggConfig(clip=1.0, bits=draw(st.sampled_from([16, 32, 40])), neighbours=neighbours,
                          max_examples=64)
    roster = names(n)
    drops = tuple(set(draw(st.lists(st.sampled_from(roster), max_size=n // 5, unique=True))) for _ in range(4))
    return n, config, drops, draw(st.integers(0, 2**16))


@FEW
@given(rounds())
def test_the_unmasked_sum_is_the_exact_sum_of_the_quantized_inputs(case: tuple[int, SecAggConfig, tuple[set[str], ...], int]) -> None:
    n, config, drops, seed = case
    trace = Trace(None, {}, {})  # type: ignore[arg-type]
    try:
        run_round(n, config, drops, seed=seed, trace=trace)
    except SecAggAbort:
        assert_never_both(trace)
        assert must_abort(trace, n, config, drops)
        return
    assert_never_both(trace)
    total = trace.coordinator.unmask_sum()
    assert total.dtype == (np.uint32 if config.bits <= 32 else np.uint64)
    np.testing.assert_array_equal(total.astype(np.uint64), quantized_sum(trace, config, seed))
    assert trace.summed == set(names(n)) - drops[0] - drops[1] - drops[2]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_party_dropping_at_each_stage_leaves_the_round_complete(stage: int) -> None:
    config = SecAggConfig(clip=1.0)
    drops: list[set[str]] = [set(), set(), set(), set()]
    drops[stage] = {"party-2"}
    trace = run_round(6, config, tuple(drops), seed=stage)
    np.testing.assert_array_equal(trace.coordinator.unmask_sum().astype(np.uint64), quantized_sum(trace, config, stage))
    assert trace.coordinator.dropouts == {"party-2": ["advertise_keys", "share_keys", "masked_input", "unmask"][stage]}
    assert ("party-2" in trace.summed) == (stage == 3)


@FEW
@given(st.integers(4, 10), st.integers(0, 3), st.integers(0, 2**16))
def test_fewer_than_t_parties_abort_the_round_and_nobody_reveals_both_shares(n: int, stage: int, seed: int) -> None:
    config = SecAggConfig(clip=1.0)
    _, t, _ = config.plan(n)
    drops: list[set[str]] = [set(), set(), set(), set()]
    drops[stage] = set(names(n)[: n - t + 1])
    trace = Trace(None, {}, {})  # type: ignore[arg-type]
    with pytest.raises(SecAggAbort, match="aborted"):
        run_round(n, config, tuple(drops), seed=seed, trace=trace)
    assert_never_both(trace)
    if stage < 3:
        assert not trace.revealed


def test_a_single_masked_vector_is_uniform() -> None:
    config = SecAggConfig(clip=1.0, bits=32)
    coordinator = SecAggCoordinator(config, run="r", round=0, parties=names(3), dimension=200_000)
    parties = {p: SecAggParty(p, coordinator.setup) for p in names(3)}
    for p, party in parties.items():
        coordinator.receive_keys(p, party.advertise_keys())
    request = coordinator.share_keys_request()
    for p, party in parties.items():
        coordinator.receive_shares(p, party.share_keys(request, MODEL))
    requests = coordinator.masked_input_requests()
    y = parties["party-0"].masked_input(requests["party-0"], np.zeros(200_000), 1)["masked"]
    for byte in (0, 3):  # the lowest and the highest byte of each value
        counts = np.bincount((y >> np.uint32(8 * byte)) & np.uint32(0xFF), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-6


def test_one_flipped_seed_bit_gives_an_unrelated_stream() -> None:
    seed = bytes(range(32))
    flipped = bytes([seed[0] ^ 1]) + seed[1:]
    a, b = masking.prg(seed, 1 << 18), masking.prg(flipped, 1 << 18)
    differing = np.unpackbits((a ^ b).view(np.uint8)).mean()
    assert 0.49 < differing < 0.51
    assert np.mean(a == b) < 1e-3
    assert abs(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]) < 0.02
    np.testing.assert_array_equal(masking.prg(seed, 1000), masking.prg(seed, 1 << 18)[:1000])


#: SP 800-38D: with a 96-bit nonce N, GCM encrypts the first block under the counter block N || 2.
GCM_FIRST_COUNTER = bytes(12) + b"\x00\x00\x00\x02"


@pytest.mark.parametrize("key_size", [16, 32])
def test_the_fast_keystream_is_aes_ctr_from_gcms_first_counter_however_it_is_cut(key_size: int) -> None:
    """stream.keystream draws through the GCM encryptor; its bytes must be plain AES-CTR's, in any pieces."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(key_size))
    expected = Cipher(algorithms.AES(key), modes.CTR(GCM_FIRST_COUNTER)).encryptor().update(bytes(300_007))
    fast, out = stream.keystream(key), bytearray()
    for size in (1, 15, 16, 17, 4096, 100_000, 195_862):  # ragged pieces, across block boundaries
        buffer = bytearray(size + 16)
        assert fast.update_into(bytes(size), buffer) == size
        out += buffer[:size]
    assert bytes(out) == expected
    assert stream.keystream(key).update(bytes(64)) == expected[:64]
    assert stream.keystream(bytes(key_size - 1) + b"\x01").update(bytes(64)) != expected[:64]
    for bad in (bytes(24), bytes(15), "k" * 16):
        with pytest.raises(ValueError, match="16 or 32 bytes"):
            stream.keystream(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_the_prg_is_the_aes_ctr_keystream_across_slices(dtype: type[np.unsignedinteger]) -> None:
    """Masks are applied slice by slice; each seed must still add exactly its one keystream."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    seeds = [bytes([i]) * 32 for i in range(3)]
    length = 3 * masking._SLICE + 7  # several whole slices and a ragged tail
    width = np.dtype(dtype).itemsize
    def keystream(seed: bytes) -> np.ndarray:
        # AES-128-CTR from the counter block 0^96 || 2 under HKDF-SHA256(seed), as the module's docstring says
        key = HKDF(algorithm=hashes.SHA256(), length=16, salt=None,
                   info=b"fednb secure aggregation prg: aes-128-ctr").derive(seed)
        raw = Cipher(algorithms.AES(key), modes.CTR(GCM_FIRST_COUNTER)).encryptor().update(bytes(length * width))
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    vector = np.arange(length, dtype=dtype)
    expected = vector + keystream(seeds[0]) + keystream(seeds[1]) - keystream(seeds[2])
    masking.apply_masks(vector, seeds[:2], seeds[2:])
    np.testing.assert_array_equal(vector, expected)
    np.testing.assert_array_equal(masking.prg(seeds[0], length, dtype), keystream(seeds[0]))



@pytest.mark.parametrize("bits", [24, 32, 48])
def test_quantizing_and_masking_in_one_pass_is_masking_the_quantized_vector(bits: int) -> None:
    """A party masks each slice as quantization makes it: the same vector as masking it whole afterwards."""
    quantizer = Quantizer(2.0, 100, 5, bits)
    x = np.random.default_rng(1).normal(size=2 * masking._SLICE + 11).astype(np.float32) * 1e-3
    seeds = [bytes([i]) * 32 for i in range(4)]
    expected = quantizer.quantize(x, 7, np.random.default_rng(5))
    masking.apply_masks(expected, seeds[:3], seeds[3:])
    np.bitwise_and(expected, expected.dtype.type(quantizer.modulus_mask), out=expected)
    fused = quantizer.quantize(x, 7, np.random.default_rng(5), masks=masking.Masks(seeds[:3], seeds[3:]).apply)
    np.testing.assert_array_equal(fused, expected)


@FEW
@given(st.lists(st.floats(-2.0**60, 2.0**60, width=32), max_size=2500),
       st.sampled_from([0.0, 1e-25, 1.0, 1e15]))
def test_the_quick_norm_bound_is_above_the_exact_norm_and_within_its_margin(values: list[float], scale: float) -> None:
    """The float32 pass that spares most updates the float64 norm never undercuts it, nor exceeds it by 2^-11."""
    from fractions import Fraction

    from fednb.privacy.quantize import _squares_bound

    x = np.array(values, dtype=np.float32) * np.float32(scale) if scale else np.array(values, dtype=np.float32)
    exact = sum((Fraction(float(v)) ** 2 for v in x), Fraction(0))
    bound = _squares_bound(x)
    if not np.isfinite(bound):
        assert exact >= Fraction(float(np.finfo(np.float32).max)) / 1025  # only a square or block beyond float32
        return
    assert exact <= Fraction(bound) <= exact * (1 + Fraction(1, 2048)) + Fraction(x.size, 2**124)


@pytest.mark.parametrize("norm", [0.5, 1.9999, 2.0, 2.0001, 40.0, 1e30])
def test_the_quick_norm_changes_no_quantized_value(norm: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the clip, near it (where the exact norm decides) and beyond float32's squares: the same integers."""
    from fednb.privacy import quantize

    quantizer = Quantizer(2.0, 100, 5, 32)
    x = np.random.default_rng(2).normal(size=5000)
    x = (x * (norm / np.linalg.norm(x))).astype(np.float32)
    quick = quantizer.quantize(x, 3, np.random.default_rng(9))
    monkeypatch.setattr(quantize, "_squares_bound", lambda flat: float("inf"))  # always the exact float64 norm
    np.testing.assert_array_equal(quick, quantizer.quantize(x, 3, np.random.default_rng(9)))


def test_the_update_moves_the_weights_by_the_unmasked_sum_over_its_divisor() -> None:
    """The coordinator divides the integer sum as it moves each tensor: as moving it by the float64 mean."""
    from fednb.privacy.secagg import apply_update

    rng = np.random.default_rng(3)
    weights = {"b": rng.normal(size=(3, 7)).astype(np.float32), "a": rng.normal(size=2 * 2**15 + 5),
               "n": np.array([4], dtype=np.int64)}
    total = rng.integers(-2**31, 2**31, size=3 * 7 + 2 * 2**15 + 5 + 1, dtype=np.int64).astype(np.int32)
    divisor = 12345.678
    moved = apply_update(weights, total, divisor)
    reference = apply_update(weights, total / divisor)
    assert list(moved) == list(weights)
    for name in weights:
        assert moved[name].dtype == weights[name].dtype and moved[name].shape == weights[name].shape
        np.testing.assert_array_equal(moved[name], reference[name])
    offset = {"a": 0, "b": 2 * 2**15 + 5, "n": 2 * 2**15 + 5 + 21}
    np.testing.assert_array_equal(moved["a"], weights["a"] + total[:offset["b"]] / divisor)
    assert moved["n"][0] == np.rint(4 + total[-1] / divisor)
    with pytest.raises(ValueError, match="does not fit"):
        apply_update(weights, total[:-1], divisor)


def test_stochastic_rounding_draws_its_uniforms_from_an_aes_ctr_stream() -> None:
    """A party's rounding noise is the AES-128-CTR keystream, one 32-bit word per value times 2^-32."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(16))
    source = SecureUniform(key)
    first, second = np.empty(1000), np.empty(1 << 16)
    source.random(out=first)
    source.random(out=second)  # the stream carries on: no value is drawn twice
    words = np.frombuffer(Cipher(algorithms.AES(key), modes.CTR(GCM_FIRST_COUNTER)).encryptor()
                          .update(bytes(4 * (first.size + second.size))), dtype="<u4")
    np.testing.assert_array_equal(np.concatenate([first, second]), words / 2.0**32)
    assert 0.0 <= second.min() and second.max() < 1.0
    assert stats.chisquare(np.histogram(second, bins=64, range=(0, 1))[0]).pvalue > 1e-6
    assert not np.array_equal(SecureUniform().random(out=np.empty(8)), SecureUniform().random(out=np.empty(8)))
    with pytest.raises(TypeError, match="float64"):
        source.random(out=np.empty(4, np.float32), dtype=np.float32)
    party = SecAggParty("a", RoundSetup("run", 1, SecAggConfig(clip=1.0), 3))
    assert isinstance(party._rng, SecureUniform)  # not numpy's generator, unless a test seeds one


def test_a_party_refuses_a_round_that_masks_with_another_prg() -> None:
    """Masks from two PRGs would not cancel: a setup naming another PRG is refused before any key is drawn."""
    setup = RoundSetup("run", 1, SecAggConfig(clip=1.0), 3).to_dict()
    assert setup["prg"] == masking.PRG
    assert RoundSetup.from_dict(setup) == RoundSetup("run", 1, SecAggConfig(clip=1.0), 3)
    for other in ({**setup, "prg": "aes-256-ctr"}, {k: v for k, v in setup.items() if k != "prg"}):
        with pytest.raises(ValueError, match="masks do not cancel"):
            RoundSetup.from_dict(other)


def _secrets_of(trace: Trace) -> list[bytes]:
    found: list[bytes] = []
    for party in trace.parties.values():
        found.append(party._encryption.private_bytes_raw())
        found.append(party._signing.private_bytes_raw())
        if party._masking is not None:  # erased once the party sent its masked input
            found.append(party._masking.private_bytes_raw())
        found.extend(share for pair in party._held.values() for share in pair)
    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, str) and len(value) >= 40:
            try:
                found.append(base64.b64decode(value, validate=True))
            except ValueError:
                pass  # a hex string, not base64: it is searched for as it stands below
    for message in trace.messages:
        walk(message)
    return found


def test_shares_and_keys_never_appear_in_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    trace = run_round(9, SecAggConfig(clip=1.0), (set(), {"party-1"}, {"party-2"}, {"party-3"}))
    aborted = Trace(None, {}, {})  # type: ignore[arg-type]
    with pytest.raises(SecAggAbort) as caught:
        run_round(4, SecAggConfig(clip=1.0), seed=1, hashes={"party-0": b"y" * 32}, trace=aborted)
    assert any("unmasked the sum" in record.getMessage() for record in caplog.records)
    text = caplog.text + str(caught.value)
    secrets = _secrets_of(trace) + _secrets_of(aborted)
    assert len(secrets) > 100
    for secret in secrets:
        for form in (secret.hex(), base64.b64encode(secret).decode(), base64.b64encode(secret[:24]).decode()):
            assert form not in text


def test_weighted_fedavg_matches_the_plain_weighted_mean_within_the_reported_error() -> None:
    config = SecAggConfig(clip=2.0, max_examples=1000)
    trace = run_round(7, config, (set(), set(), {"party-4"}, {"party-5"}), dimension=500, seed=5, scale=0.3)
    result = trace.coordinator.result()
    clipped = {}
    for p in trace.summed:
        x, examples = trace.inputs[p]
        norm = np.linalg.norm(x)
        clipped[p] = (x * min(1.0, 2.0 / norm), examples)
    assert any(np.linalg.norm(trace.inputs[p][0]) > 2.0 for p in trace.summed)  # clipping is exercised
    weight = sum(e for _, e in clipped.values())
    mean = sum(e * x for x, e in clipped.values()) / weight
    assert result.examples == weight
    assert result.parties == tuple(sorted(trace.summed))
    assert 0 < result.error_bound < 1e-4
    assert np.max(np.abs(result.update - mean)) <= result.error_bound


def _after_masked_input(n: int = 5) -> tuple[SecAggCoordinator, dict[str, SecAggParty], dict[str, list[str]]]:
    config = SecAggConfig(clip=1.0)
    coordinator = SecAggCoordinator(config, run="r", round=0, parties=names(n), dimension=4)
    parties = {p: SecAggParty(p, coordinator.setup) for p in names(n)}
    for p, party in parties.items():
        coordinator.receive_keys(p, party.advertise_keys())
    request = coordinator.share_keys_request()
    for p, party in parties.items():
        coordinator.receive_shares(p, party.share_keys(request, MODEL))
    requests = coordinator.masked_input_requests()
    for p, party in parties.items():
        coordinator.receive_masked_input(p, party.masked_input(requests[p], np.ones(4) / 4, 3))
    return coordinator, parties, coordinator.unmask_request()


def test_a_party_asked_for_both_shares_of_one_peer_refuses_and_stays_refused() -> None:
    coordinator, parties, request = _after_masked_input()
    cheat = {"survivors": request["survivors"], "dropped": ["party-1"]}
    with pytest.raises(SecAggAbort, match="both shares of party-1"):
        parties["party-0"].unmask(cheat)
    with pytest.raises(SecAggAbort, match="stage"):
        parties["party-0"].unmask(request)  # a refused party answers no second request


@pytest.mark.parametrize("survivors, dropped, reason", [
    (["party-0", "party-1", "party-2", "party-3"], [], "not the parties that shared keys"),
    (["party-1", "party-2", "party-3", "party-4"], ["party-0"], "names it as dropped"),
    (["party-0", "party-1"], ["party-2", "party-3", "party-4"], "with 2 survivors"),
])
def test_a_party_refuses_an_unmasking_request_inconsistent_with_what_it_saw(
        survivors: list[str], dropped: list[str], reason: str) -> None:
    _, parties, _ = _after_masked_input()
    with pytest.raises(SecAggAbort, match=reason):
        parties["party-0"].unmask({"survivors": survivors, "dropped": dropped})


def test_two_model_hashes_abort_the_round() -> None:
    other = hashlib.sha256(b"another model").digest()
    with pytest.raises(SecAggAbort, match="two model hashes"):
        run_round(5, SecAggConfig(clip=1.0), hashes={"party-3": other})


def test_a_coordinator_that_checks_the_hash_drops_a_party_that_signed_another() -> None:
    coordinator = SecAggCoordinator(SecAggConfig(clip=1.0), run="r", round=0, parties=names(3), dimension=2,
                                    model_hash=MODEL)
    parties = {p: SecAggParty(p, coordinator.setup) for p in names(3)}
    for p, party in parties.items():
        coordinator.receive_keys(p, party.advertise_keys())
    request = coordinator.share_keys_request()
    with pytest.raises(SecAggMessageError, match="party-0 signed the hash of a model other"):
        coordinator.receive_shares("party-0", parties["party-0"].share_keys(request, b"x" * 32))


def _tamper(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("damage, error", [
    (_tamper, "the share from party-1 fails authentication"),
    (lambda text: text[:-8], "party-1 sent a bad encrypted share"),
    (lambda text: "!" + text[1:], "party-1 sent a bad encrypted share"),
])
def test_a_damaged_share_is_a_clear_error_naming_its_sender(damage: Any, error: str) -> None:
    config = SecAggConfig(clip=1.0)
    coordinator = SecAggCoordinator(config, run="r", round=0, parties=names(3), dimension=2)
    parties = {p: SecAggParty(p, coordinator.setup) for p in names(3)}
    for p, party in parties.items():
        coordinator.receive_keys(p, party.advertise_keys())
    request = coordinator.share_keys_request()
    for p, party in parties.items():
        coordinator.receive_shares(p, party.share_keys(request, MODEL))
    mine = coordinator.masked_input_requests()["party-0"]
    mine["shares"] = dict(mine["shares"], **{"party-1": damage(mine["shares"]["party-1"])})
    with pytest.raises(SecAggMessageError, match=error) as caught:
        parties["party-0"].masked_input(mine, np.zeros(2), 1)
    assert caught.value.party == "party-1"


def test_a_share_relayed_to_another_party_does_not_open() -> None:
    config = SecAggConfig(clip=1.0)
    coordinator = SecAggCoordinator(config, run="r", round=0, parties=names(3), dimension=2)
    parties = {p: SecAggParty(p, coordinator.setup) for p in names(3)}
    for p, party in parties.items():
        coordinator.receive_keys(p, party.advertise_keys())
    request = coordinator.share_keys_request()
    for p, party in parties.items():
        coordinator.receive_shares(p, party.share_keys(request, MODEL))
    requests = coordinator.masked_input_requests()
    mine = requests["party-0"]
    mine["shares"] = dict(mine["shares"], **{"party-1": requests["party-2"]["shares"]["party-1"]})
    with pytest.raises(SecAggMessageError, match="party-1 fails authentication"):
        parties["party-0"].masked_input(mine, np.zeros(2), 1)


def test_the_coordinator_rejects_malformed_replies_naming_the_party() -> None:
    coordinator = SecAggCoordinator(SecAggConfig(clip=1.0), run="r", round=0, parties=names(3), dimension=4)
    parties = {p: SecAggParty(p, coordinator.setup) for p in names(3)}
    keys = parties["party-0"].advertise_keys()
    with pytest.raises(SecAggMessageError, match="party-1 sent a bad encryption_key"):
        coordinator.receive_keys("party-1", dict(keys, encryption_key="AAAA"))
    with pytest.raises(SecAggMessageError, match="small order"):
        coordinator.receive_keys("party-1", dict(keys, masking_key=base64.b64encode(bytes(32)).decode()))
    coordinator.receive_keys("party-0", keys)
    with pytest.raises(SecAggMessageError, match="party-1 advertised a key that is already in use"):
        coordinator.receive_keys("party-1", keys)
    with pytest.raises(SecAggMessageError, match="answered the advertise_keys stage twice"):
        coordinator.receive_keys("party-0", keys)
    with pytest.raises(SecAggMessageError, match="not expected"):
        coordinator.receive_keys("stranger", parties["party-1"].advertise_keys())


@pytest.mark.parametrize("masked", [np.zeros(5, np.int64), np.zeros(4, np.uint32), np.zeros((5, 1), np.uint32),
                                    [0, 0, 0, 0, 0]])
def test_a_masked_input_of_the_wrong_size_or_type_is_refused(masked: Any) -> None:
    coordinator = SecAggCoordinator(SecAggConfig(clip=1.0), run="r", round=0, parties=names(3), dimension=4)
    parties = {p: SecAggParty(p, coordinator.setup) for p in names(3)}
    for p, party in parties.items():
        coordinator.receive_keys(p, party.advertise_keys())
    request = coordinator.share_keys_request()
    for p, party in parties.items():
        coordinator.receive_shares(p, party.share_keys(request, MODEL))
    coordinator.masked_input_requests()
    with pytest.raises(SecAggMessageError, match="party-1 sent a masked input that is not 5 uint32 values"):
        coordinator.receive_masked_input("party-1", {"masked": masked})
    assert coordinator.masked == ()


def test_stages_run_once_and_in_order() -> None:
    setup = RoundSetup("r", 0, SecAggConfig(clip=1.0), 3)
    party = SecAggParty("party-0", setup)
    with pytest.raises(SecAggAbort, match="at stage 'advertise_keys', not 'unmask'"):
        party.unmask({"survivors": [], "dropped": []})
    with pytest.raises(SecAggAbort):
        party.advertise_keys()  # after a refusal the party takes no further part
    assert party.stage == "aborted"


def test_a_party_takes_part_only_in_a_large_enough_aggregate() -> None:
    coordinator = SecAggCoordinator(SecAggConfig(clip=1.0), run="r", round=0, parties=names(3), dimension=2)
    parties = {p: SecAggParty(p, coordinator.setup, min_parties=4) for p in names(3)}
    for p, party in parties.items():
        coordinator.receive_keys(p, party.advertise_keys())
    with pytest.raises(SecAggAbort, match="at least 4 parties"):
        parties["party-0"].share_keys(coordinator.share_keys_request(), MODEL)


@pytest.mark.parametrize("kwargs, message", [
    ({"clip": 0.0}, "clip"),
    ({"clip": float("inf")}, "clip"),
    ({"clip": 1.0, "bits": 15}, "bits"),
    ({"clip": 1.0, "bits": 63}, "bits"),
    ({"clip": 1.0, "threshold": 1}, "threshold"),
    ({"clip": 1.0, "max_examples": 0}, "max_examples"),
    ({"clip": 1.0, "bits": 16, "max_examples": 2**15}, "max_examples"),
])
def test_bad_parameters_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SecAggConfig(**kwargs)


def test_a_round_the_modulus_cannot_hold_is_refused_before_any_message() -> None:
    with pytest.raises(ValueError, match="would wrap"):
        SecAggCoordinator(SecAggConfig(clip=1.0, bits=16, max_examples=1000), run="r", round=0,
                          parties=names(40), dimension=2)
    with pytest.raises(ValueError, match="must exceed half"):
        SecAggCoordinator(SecAggConfig(clip=1.0, threshold=3), run="r", round=0, parties=names(6), dimension=2)
    with pytest.raises(ValueError, match="needs 7 share holders"):
        SecAggCoordinator(SecAggConfig(clip=1.0, threshold=7), run="r", round=0, parties=names(6), dimension=2)


@FEW
@given(st.integers(1, 40), st.sampled_from([16, 24, 32, 48, 62]), st.booleans())
def test_the_largest_inputs_of_the_most_parties_do_not_wrap(parties: int, bits: int, negative: bool) -> None:
    max_examples = min(100, (2 ** (bits - 1) - 1) // parties)
    quantizer = Quantizer(3.0, max_examples, parties, bits)
    x = np.array([-3.0 if negative else 3.0, 0.0, 1e-9])
    total = np.zeros(4, dtype=np.uint64)
    rng = np.random.default_rng(0)
    for _ in range(parties):
        total = (total + quantizer.quantize(x, 10**9, rng).astype(np.uint64)) & np.uint64(quantizer.modulus_mask)
    mean, examples = quantizer.decode(total.astype(quantizer.dtype))
    assert examples == parties * max_examples
    assert abs(mean[0] - x[0]) <= quantizer.error_bound(parties, examples)


@FEW
@given(st.binary(min_size=1, max_size=64), st.integers(2, 30), st.data())
def test_shamir_any_t_shares_rebuild_the_secret_and_fewer_do_not(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    ids = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = split(secret, t, ids)
    chosen = data.draw(st.lists(st.sampled_from(ids), min_size=t, max_size=n, unique=True))
    assert combine({x: shares[x] for x in chosen}, t) == secret
    if t > 1:
        with pytest.raises(ValueError, match="cannot rebuild"):
            combine({x: shares[x] for x in chosen[: t - 1]}, t)


def test_shamir_refuses_malformed_shares() -> None:
    shares = split(bytes(range(32)), 2, [1, 2, 3])
    with pytest.raises(ValueError, match="length"):
        combine({1: shares[1], 2: shares[2][:-1]}, 2)
    with pytest.raises(ValueError, match="outside the field"):
        combine({1: shares[1], 2: shares[2][:1] + b"\xff" * 16 + shares[2][17:]}, 2)
    with pytest.raises(ValueError, match="distinct"):
        split(b"secret", 2, [1, 1, 2])


def test_neighbour_graphs_are_regular_symmetric_and_connected() -> None:
    roster = names(100)
    k = graph.degree(100)
    assert graph.degree(10) == 9 and graph.degree(100) == 20 and graph.degree(100, 7) == 8
    edges = graph.neighbours(roster, k, b"seed")
    assert all(len(peers) == k and p not in peers for p, peers in edges.items())
    assert all(p in edges[q] for p, peers in edges.items() for q in peers)
    seen, frontier = {"party-0"}, ["party-0"]
    while frontier:
        for q in edges[frontier.pop()] - seen:
            seen.add(q)
            frontier.append(q)
    assert seen == set(roster)
    assert edges == graph.neighbours(list(reversed(roster)), k, b"seed")
    assert edges != graph.neighbours(roster, k, b"other seed")


def _wrong(share: str) -> str:
    raw = bytearray(base64.b64decode(share))
    raw[-1] ^= 1  # still a well-formed share, of a different secret
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("holders, completes", [(5, True), (4, False)])
def test_one_wrong_share_is_outvoted_when_a_spare_share_exists(holders: int, completes: bool) -> None:
    config = SecAggConfig(clip=1.0, threshold=4)
    coordinator = SecAggCoordinator(config, run="r", round=0, parties=names(6), dimension=3)
    parties = {p: SecAggParty(p, coordinator.setup) for p in names(6)}
    for p, party in parties.items():
        coordinator.receive_keys(p, party.advertise_keys())
    keys = coordinator.share_keys_request()
    for p, party in parties.items():
        coordinator.receive_shares(p, party.share_keys(keys, MODEL))
    requests = coordinator.masked_input_requests()
    inputs = {p: np.full(3, 0.1 * i) for i, p in enumerate(names(6))}
    for p in names(5):  # party-5 drops before its masked input: its masking key must be rebuilt
        coordinator.receive_masked_input(p, parties[p].masked_input(requests[p], inputs[p], 2))
    unmasking = coordinator.unmask_request()
    for p in names(5)[:holders]:  # the survivors that answer: each secret has this many holders
        reply = parties[p].unmask(unmasking)
        if p == "party-0":
            reply["self_mask_shares"]["party-1"] = _wrong(reply["self_mask_shares"]["party-1"])
            reply["masking_key_shares"]["party-5"] = _wrong(reply["masking_key_shares"]["party-5"])
        coordinator.receive_unmask(p, reply)
    if completes:
        result = coordinator.result()
        expected = sum(inputs[p] for p in names(5)) / 5
        assert np.max(np.abs(result.update - expected)) <= result.error_bound
    else:
        with pytest.raises(SecAggAbort, match="a holder sent a wrong share"):
            coordinator.unmask_sum()
        with pytest.raises(SecAggAbort, match="at stage 'aborted'"):  # an aborted round stays aborted
            coordinator.result()
