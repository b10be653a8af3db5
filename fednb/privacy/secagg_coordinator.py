"""The coordinator's side of secure aggregation: relay, bookkeeping, and the unmasked sum (see :mod:`fednb.privacy.secagg`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fednb.privacy import masking, shamir
from fednb.privacy.secagg import (
    PublicKeys,
    RoundSetup,
    SEALED,
    SHARE,
    SecAggAbort,
    SecAggConfig,
    SecAggError,
    SecAggMessageError,
    SecAggResult,
    _Roster,
    _Stages,
    _bytes,
    _fields,
    _table,
)

log = logging.getLogger(__name__)


class SecAggCoordinator:
    """The coordinator's side of a secure round: relays keys and shares, sums masked inputs, unmasks the sum.

    Each ``receive_*`` method takes one party's reply and raises :class:`SecAggMessageError`
    naming that party if the reply cannot be used (the round loop then drops that party); each
    ``*_request`` method closes the stage before it, notes who dropped, and raises
    :class:`SecAggAbort` when too few parties remain. ``model_hash``, when given, is checked
    against the hash each party signed.
    """

    def __init__(self, config: SecAggConfig, *, run: str, round: int, parties: Sequence[str], dimension: int,
                 model_hash: bytes | None = None) -> None:
        self.setup = RoundSetup(run, round, config, dimension)
        invited = sorted(set(parties))
        if not all(isinstance(name, str) and name for name in invited) or len(invited) != len(parties):
            raise ValueError("parties are distinct non-empty names")
        # an impossible configuration fails here, before any message; the invited round's threshold
        # is also the least number of parties that must advertise keys, so that early dropouts
        # cannot shrink the aggregate (the plan of the parties that did advertise may lower t)
        _, self._least, _ = config.plan(len(invited))
        self.invited = tuple(invited)
        self._model_hash = model_hash.hex() if model_hash is not None else None
        self._stages = _Stages("the coordinator", ("advertise_keys", "share_keys", "masked_input", "unmask", "sum"),
                               round)
        self.dropouts: dict[str, str] = {}
        self._keys: dict[str, PublicKeys] = {}
        self._roster: _Roster | None = None
        self._sealed: dict[str, Mapping[str, str]] = {}
        self._signed: dict[str, dict[str, str]] = {}
        self._commitments: dict[str, bytes] = {}
        self._sum: np.ndarray | None = None
        self._masked: set[str] = set()
        self._seed_shares: dict[str, dict[int, bytes]] = {}
        self._key_shares: dict[str, dict[int, bytes]] = {}
        self._unmasked: set[str] = set()
        self._total: np.ndarray | None = None

    # -- who is where -------------------------------------------------------------------------

    @property
    def advertised(self) -> tuple[str, ...]:
        """U1: the parties whose keys were accepted (the share-keys stage goes to them)."""
        return tuple(sorted(self._keys))

    @property
    def shared(self) -> tuple[str, ...]:
        """U2: the parties whose shares were accepted (the masked-input stage goes to them)."""
        return tuple(sorted(self._sealed))

    @property
    def masked(self) -> tuple[str, ...]:
        """U3: the parties whose masked inputs are in the sum (the unmasking stage goes to them)."""
        return tuple(sorted(self._masked))

    def _expect(self, stage: str, party: str, allowed: set[str] | tuple[str, ...], seen: Any) -> None:
        current = self._stages.current
        if current != f"running {stage}" and current != stage:
            raise SecAggMessageError(f"a {stage} reply from {party} arrived at stage {current!r}", party=party)
        if party not in allowed:
            raise SecAggMessageError(f"{party} is not expected in the {stage} stage", party=party)
        if party in seen:
            raise SecAggMessageError(f"{party} answered the {stage} stage twice", party=party)

    def _close(self, stage: str, expected: tuple[str, ...], answered: Any, needed: int | None) -> None:
        for party in expected:
            if party not in answered:
                self.dropouts.setdefault(party, stage)
        if needed is not None and len(answered) < needed:
            revealed = ("no party revealed both secrets of anyone" if stage == "unmask"
                        else "no share was revealed")
            raise SecAggAbort(f"round {self.setup.round} aborted: {len(answered)} parties remain after {stage}, "
                              f"fewer than the threshold {needed}; {revealed}", round=self.setup.round)

    # -- AdvertiseKeys -----------------------------------------------------------------------

    def advertise_keys_request(self) -> dict[str, Any]:
        """The request that opens the round: run, round, parameters and vector length (to every invited party)."""
        return self.setup.to_dict()

    def receive_keys(self, party: str, content: Mapping[str, Any]) -> None:
        """One party's advertised keys."""
        self._expect("advertise_keys", party, self.invited, self._keys)
        keys = PublicKeys.from_dict(content, party)
        probe = X25519PrivateKey.generate()
        for raw in (keys.encryption, keys.masking):
            try:
                masking.agree(probe, raw, b"probe")
            except ValueError:
                raise SecAggMessageError(f"{party} advertised an X25519 key of small order", party=party) from None
        taken = {raw for other in self._keys.values() for raw in (other.encryption, other.masking, other.signing)}
        if {keys.encryption, keys.masking, keys.signing} & taken or len({keys.encryption, keys.masking}) < 2:
            raise SecAggMessageError(f"{party} advertised a key that is already in use", party=party)
        self._keys[party] = keys

    # -- ShareKeys ---------------------------------------------------------------------------

    def share_keys_request(self) -> dict[str, Any]:
        """Everyone's advertised keys, for every party in :attr:`advertised`."""
        with self._stages.run("advertise_keys"):
            self._close("advertise_keys", self.invited, self._keys, self._least)
            self._roster = _Roster.build(self.setup, self._keys)
            self._close("advertise_keys", self.invited, self._keys, self._roster.threshold)
            log.debug("round %d: %d parties advertised keys", self.setup.round, len(self._keys))
            return {"keys": {name: self._keys[name].to_dict() for name in self.advertised}}

    def receive_shares(self, party: str, content: Mapping[str, Any]) -> None:
        """One party's encrypted shares (relayed unopened), commitment and signed model hash."""
        self._expect("share_keys", party, self.advertised, self._sealed)
        roster = self._roster
        assert roster is not None
        fields = _fields(content, {"shares", "commitment", "model_hash", "transcript", "signature"}, party, "shares")
        shares = _table(fields["shares"], roster.neighbours[party], party, "shares")
        if set(shares) != roster.neighbours[party]:
            raise SecAggMessageError(f"{party} sent shares not addressed to exactly its neighbours", party=party)
        for text in shares.values():
            _bytes(text, SEALED, party, "encrypted share")
        commitment = _bytes(fields["commitment"], 32, party, "commitment")
        if fields["transcript"] != roster.transcript.hex():
            raise SecAggMessageError(f"{party} signed a different set of advertised keys", party=party)
        model_hash = fields["model_hash"]
        if not isinstance(model_hash, str) or not 32 <= len(model_hash) <= 128 \
                or any(c not in "0123456789abcdef" for c in model_hash):
            raise SecAggMessageError(f"{party} sent a malformed model hash", party=party)
        if self._model_hash is not None and model_hash != self._model_hash:
            raise SecAggMessageError(f"{party} signed the hash of a model other than the one sent", party=party)
        signature = _bytes(fields["signature"], masking.SIGNATURE, party, "signature")
        if not masking.verify(roster.keys[party].signing, signature, roster.statement(party, model_hash)):
            raise SecAggMessageError(f"{party}'s signature of the model hash does not verify", party=party)
        self._sealed[party] = dict(shares)
        self._commitments[party] = commitment
        self._signed[party] = {"model_hash": model_hash, "transcript": fields["transcript"],
                               "signature": fields["signature"]}

    # -- MaskedInputCollection ---------------------------------------------------------------

    def masked_input_requests(self) -> dict[str, dict[str, Any]]:
        """One request per party in :attr:`shared`: its neighbours' shares addressed to it, and their signatures."""
        with self._stages.run("share_keys"):
            roster = self._roster
            assert roster is not None
            self._close("share_keys", self.advertised, self._sealed, roster.threshold)
            shared = set(self._sealed)
            requests = {}
            for party in self.shared:
                peers = sorted(roster.neighbours[party] & shared)
                requests[party] = {"parties": list(self.shared),
                                   "shares": {peer: self._sealed[peer][party] for peer in peers},
                                   "signatures": {peer: self._signed[peer] for peer in peers}}
            log.debug("round %d: %d parties shared keys", self.setup.round, len(shared))
            return requests

    def receive_masked_input(self, party: str, content: Mapping[str, Any]) -> None:
        """One party's masked input, added into the running sum at once (one vector held, not n)."""
        self._expect("masked_input", party, self.shared, self._masked)
        roster = self._roster
        assert roster is not None
        quantizer = roster.quantizer
        y = _fields(content, {"masked"}, party, "a masked input")["masked"]
        length = self.setup.dimension + 1
        if not isinstance(y, np.ndarray) or y.dtype.kind != "u" or y.dtype.itemsize != np.dtype(quantizer.dtype).itemsize \
                or y.shape != (length,):
            raise SecAggMessageError(f"{party} sent a masked input that is not {length} "
                                     f"{np.dtype(quantizer.dtype).name} values", party=party)
        if quantizer.bits not in (32, 64) and int(y.max()) > quantizer.modulus_mask:
            raise SecAggMessageError(f"{party} sent masked values beyond 2^{quantizer.bits}", party=party)
        if self._sum is None:
            self._sum = np.zeros(length, dtype=quantizer.dtype)
        np.add(self._sum, y, out=self._sum, casting="unsafe")
        self._masked.add(party)

    # -- Unmasking ---------------------------------------------------------------------------

    def unmask_request(self) -> dict[str, list[str]]:
        """Who survived and who dropped, for every party in :attr:`masked`; aborts first if unmasking cannot succeed."""
        with self._stages.run("masked_input"):
            roster = self._roster
            assert roster is not None
            self._close("masked_input", self.shared, self._masked, roster.threshold)
            self._check_holders(self._masked, "masked_input")
            log.debug("round %d: %d masked inputs", self.setup.round, len(self._masked))
            return {"survivors": list(self.masked), "dropped": sorted(set(self._sealed) - self._masked)}

    def _check_holders(self, alive: set[str], stage: str) -> None:
        """Abort unless every secret to rebuild still has at least t live holders."""
        roster = self._roster
        assert roster is not None
        for party in sorted(self._sealed):
            if party not in self._masked and not roster.neighbours[party] & self._masked:
                continue  # a dropped party with no surviving neighbour left no mask to remove
            live = len(roster.holders(party) & alive)
            if live < roster.threshold:
                raise SecAggAbort(f"round {self.setup.round} aborted after {stage}: only {live} of {party}'s share "
                                  f"holders remain, fewer than the threshold {roster.threshold}", party=party,
                                  round=self.setup.round)

    def receive_unmask(self, party: str, content: Mapping[str, Any]) -> None:
        """One party's shares: of b_v for its surviving neighbours, of s_v for its dropped ones."""
        self._expect("unmask", party, self.masked, self._unmasked)
        roster = self._roster
        assert roster is not None
        fields = _fields(content, {"self_mask_shares", "masking_key_shares"}, party, "unmasking shares")
        held = (roster.neighbours[party] & set(self._sealed)) | {party}
        expected = {"self_mask_shares": held & self._masked, "masking_key_shares": held - self._masked}
        decoded: dict[str, dict[str, bytes]] = {}
        for name, owners in expected.items():
            table = _table(fields[name], owners, party, name.replace("_", " "))
            if set(table) != owners:
                raise SecAggMessageError(f"{party} sent {name.replace('_', ' ')} for other parties than asked",
                                         party=party)
            decoded[name] = {owner: _bytes(text, SHARE, party, "share") for owner, text in table.items()}
        x = roster.index[party]
        for owner, share in decoded["self_mask_shares"].items():
            self._seed_shares.setdefault(owner, {})[x] = share
        for owner, share in decoded["masking_key_shares"].items():
            self._key_shares.setdefault(owner, {})[x] = share
        self._unmasked.add(party)

    def unmask_sum(self) -> np.ndarray:
        """The exact sum mod 2^bits of the survivors' quantized inputs (length dimension + 1, the last the examples)."""
        if self._total is not None:
            return self._total
        with self._stages.run("unmask"):
            roster = self._roster
            assert roster is not None and self._sum is not None
            self._close("unmask", self.masked, self._unmasked, roster.threshold)
            self._check_holders(self._unmasked, "unmask")
            minus = [self._rebuild_seed(party) for party in sorted(self._masked)]
            plus: list[bytes] = []
            for dropped in sorted(set(self._sealed) - self._masked):
                survivors = sorted(roster.neighbours[dropped] & self._masked)
                if not survivors:
                    continue
                key = self._rebuild_key(dropped)
                for survivor in survivors:
                    seed = masking.agree(key, roster.keys[survivor].masking, roster.pair("mask", survivor, dropped))
                    # the survivor added PRG(s) if it sorts first, subtracted it otherwise: undo that
                    (minus if survivor < dropped else plus).append(seed)
            # every secret is rebuilt (a failure above leaves the masked sum as it was): unmasked in place
            total, self._sum = self._sum, None
            masking.apply_masks(total, plus, minus)
            if roster.quantizer.bits not in (32, 64):
                np.bitwise_and(total, total.dtype.type(roster.quantizer.modulus_mask), out=total)
            log.debug("round %d: unmasked the sum of %d parties", self.setup.round, len(self._masked))
            self._total = total
            return total

    def _rebuild(self, party: str, what: str, shares: Mapping[int, bytes], check: Callable[[bytes], bool]) -> bytes:
        """A secret from its shares, checked against what the party published (commitment or public key).

        With a spare share, a single wrong share among the first t + 1 is outvoted: the secret is
        rebuilt leaving each one out in turn until one rebuild passes the check.
        """
        roster = self._roster
        assert roster is not None
        t = roster.threshold
        if len(shares) < t:
            raise SecAggAbort(f"the {what} of {party} cannot be rebuilt: {len(shares)} of its holders answered, "
                              f"fewer than the threshold {t}", party=party, round=self.setup.round)
        xs = sorted(shares)
        subsets = [xs[:t]] + ([[x for x in xs[:t + 1] if x != skip] for skip in xs[:t + 1]] if len(xs) > t else [])
        for subset in subsets:
            try:
                secret = shamir.combine({x: shares[x] for x in subset}, t)
            except ValueError:
                continue  # a wrong share can push a chunk out of range: try the next subset
            if check(secret):
                return secret
        raise SecAggAbort(f"the shares of {party}'s {what} do not match what it published: a holder sent a wrong "
                          "share", party=party, round=self.setup.round)

    def _rebuild_seed(self, party: str) -> bytes:
        roster = self._roster
        assert roster is not None
        commitment, label = self._commitments[party], roster.label("self-mask", party)
        return self._rebuild(party, "self-mask seed", self._seed_shares.get(party, {}),
                             lambda seed: len(seed) == masking.SEED and masking.commit(seed, label) == commitment)

    def _rebuild_key(self, party: str) -> X25519PrivateKey:
        roster = self._roster
        assert roster is not None
        public = roster.keys[party].masking

        def matches(raw: bytes) -> bool:
            return len(raw) == masking.KEY and masking.x25519_public(masking.x25519_private(raw)) == public

        return masking.x25519_private(self._rebuild(party, "masking key", self._key_shares.get(party, {}), matches))

    def result(self) -> SecAggResult:
        """The weighted mean update of the survivors, their example count, and the quantization error bound."""
        roster = self._roster
        total = self.unmask_sum()
        assert roster is not None
        signed, examples = roster.quantizer.lift(total)
        return SecAggResult(signed, roster.quantizer.divisor(examples), examples, self.masked, dict(self.dropouts),
                            roster.quantizer.error_bound(len(self._masked), examples))


__all__ = ["PublicKeys", "RoundSetup", "SecAggAbort", "SecAggConfig", "SecAggCoordinator", "SecAggError",
           "SecAggMessageError", "SecAggParty", "SecAggResult"]
