"""The party's privacy ledger: it spends, refuses, survives a restart, and shows an edit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fednb.errors import FednbError, GateError
from fednb.privacy.accountant import Mechanism, epsilon
from fednb.privacy.ledger import GENESIS, BudgetExceeded, Ledger, LedgerError, ledger_path

DELTA = 1e-5
ROUND = Mechanism("dpsgd", 128 / 1437, 2.0, 11)  # one epoch of digits at batch 128: ε ≈ 0.86


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return ledger_path(tmp_path)


def charge(ledger: Ledger, round: int, mechanism: Mechanism = ROUND) -> dict:
    return ledger.charge(mechanism, coordinator="c0ffee" * 7, label="alice", run="run-1", round=round)


def spend_three(path: Path) -> Ledger:
    ledger = Ledger(path, 3.0, DELTA)
    for r in (1, 2, 3):
        charge(ledger, r)
    return ledger


def test_charges_are_accounted_and_survive_a_reopen(path):
    ledger = spend_three(path)
    assert ledger.spent == pytest.approx(epsilon([ROUND] * 3, DELTA))
    assert ledger.history == [ROUND] * 3
    head = ledger.head()
    assert head != GENESIS and len(head) == 64
    again = Ledger(path, 3.0, DELTA)
    assert again.spent == ledger.spent and again.head() == head and again.check_head(head) == 0
    summary = again.summary()
    assert summary["epsilon_budget"] == 3.0 and summary["delta"] == DELTA
    assert summary["epsilon_remaining"] == pytest.approx(3.0 - ledger.spent)
    assert [h["round"] for h in summary["history"]] == [1, 2, 3]
    first = summary["history"][0]
    assert first["mechanism"] == "dpsgd" and first["steps"] == 11 and first["label"] == "alice"
    assert first["epsilon_after"] == pytest.approx(epsilon([ROUND], DELTA))
    json.dumps(summary, allow_nan=False)  # plain values, ready for a reply
    table = again.format_table()
    assert "alice" in table and "run-1" in table and f"{ledger.spent:.4g}" in table
    lines = path.read_bytes().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["kind"] == "budget"
    assert sorted(p.name for p in path.parent.iterdir()) == [".privacy.jsonl.lock", "privacy.jsonl"]  # no temp files


def test_a_refused_request_leaves_the_ledger_byte_for_byte_unchanged(path):
    ledger = spend_three(path)
    before = path.read_bytes()
    big = Mechanism("dpsgd", 0.5, 0.6, 500)
    with pytest.raises(BudgetExceeded) as refused:
        charge(ledger, 4, big)
    assert path.read_bytes() == before
    error = refused.value
    assert isinstance(error, FednbError)
    assert error.spent == pytest.approx(ledger.spent) and error.budget == 3.0
    assert error.after == pytest.approx(epsilon([ROUND] * 3 + [big], DELTA))
    assert error.remaining == pytest.approx(3.0 - ledger.spent)
    message = str(error)
    for number in (error.spent, error.cost, error.remaining):
        assert f"{number:.4g}" in message
    assert "spent" in message and "cost" in message and "left" in message
    # and still after a restart
    with pytest.raises(BudgetExceeded):
        charge(Ledger(path, 3.0, DELTA), 4, big)
    assert path.read_bytes() == before


def test_spending_stops_at_the_budget(path):
    ledger = Ledger(path, 1.0, DELTA)
    rounds = 0
    with pytest.raises(BudgetExceeded):
        while True:
            charge(ledger, rounds + 1)
            rounds += 1
    assert rounds >= 1 and ledger.spent <= 1.0 < epsilon([ROUND] * (rounds + 1), DELTA)


def test_two_handles_account_each_others_charges(path):
    first, second = Ledger(path, 3.0, DELTA), Ledger(path, 3.0, DELTA)
    charge(first, 1)
    charge(second, 2)  # reads the file back under the lock: it sees the first charge
    assert Ledger(path).history == [ROUND, ROUND]


def _rewrite(path: Path, number: int, change) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number] = change(lines[number])
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("line", [1, 3])  # a middle line and the last one
def test_an_edited_line_is_detected(path, line):
    spend_three(path)
    _rewrite(path, line, lambda raw: raw.replace(b'"noise_multiplier":2.0', b'"noise_multiplier":9.9'))
    with pytest.raises(LedgerError, match=f"line {line + 1}"):
        Ledger(path, 3.0, DELTA)


def test_an_edit_with_its_own_hash_recomputed_breaks_the_chain(path):
    from fednb.privacy.ledger import _encode, record_hash

    spend_three(path)

    def forge(raw: bytes) -> bytes:
        record = json.loads(raw)
        record["steps"] = 1
        record["hash"] = record_hash(record)
        return _encode(record)

    _rewrite(path, 1, forge)
    with pytest.raises(LedgerError, match="line 3 does not carry the hash of line 2"):
        Ledger(path)


def test_truncated_removed_and_reordered_lines_are_detected(path):
    spend_three(path)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(LedgerError, match="incomplete line"):
        Ledger(path, 3.0, DELTA)
    lines = data.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    with pytest.raises(LedgerError, match="line 3"):
        Ledger(path)
    path.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    with pytest.raises(LedgerError):
        Ledger(path)
    path.write_bytes(b"".join(lines[:2]) + b"not json\n" + lines[3])
    with pytest.raises(LedgerError, match="line 3 is not valid JSON"):
        Ledger(path)


def test_removed_last_lines_show_against_the_head_the_audit_log_keeps(path):
    ledger = spend_three(path)
    audit_head, earlier = ledger.head(), ledger._hashes[-2]
    assert ledger.check_head(earlier) == 1  # a charge the audit log missed only overstates ε
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    reopened = Ledger(path, 3.0, DELTA)  # the file alone still verifies
    with pytest.raises(LedgerError, match="removed"):
        reopened.check_head(audit_head)
    assert isinstance(LedgerError("x"), GateError)


def test_delta_is_fixed_and_a_new_budget_is_recorded(path):
    spend_three(path)
    with pytest.raises(LedgerError, match="δ = 1e-05"):
        Ledger(path, 3.0, 1e-6)
    raised = Ledger(path, 5.0, DELTA)
    assert raised.epsilon_budget == 5.0 and Ledger(path).epsilon_budget == 5.0
    assert json.loads(path.read_bytes().splitlines()[-1])["kind"] == "budget"
    lowered = Ledger(path, 0.1, DELTA)
    assert lowered.remaining == 0.0
    with pytest.raises(BudgetExceeded):
        charge(lowered, 4)


def test_reading_needs_an_existing_ledger_and_arguments_are_checked(path):
    with pytest.raises(LedgerError, match="no privacy ledger"):
        Ledger(path)
    with pytest.raises(ValueError, match="both"):
        Ledger(path, 3.0)
    for budget, delta in ((0, DELTA), (-1, DELTA), (float("inf"), DELTA), (3.0, 0), (3.0, 1.0)):
        with pytest.raises(ValueError):
            Ledger(path, budget, delta)
    ledger = Ledger(path, 3.0, DELTA)
    with pytest.raises(ValueError, match="Mechanism"):
        ledger.charge({"kind": "dpsgd"}, coordinator="c", run="r")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="round"):
        ledger.charge(ROUND, coordinator="c", run="r", round=True)
    assert ledger.summary()["history"] == [] and "no charges" in ledger.format_table()


def test_a_forged_last_line_of_the_wrong_types_is_refused(path):
    from fednb.privacy.ledger import _encode, record_hash

    spend_three(path)

    def forge(raw: bytes) -> bytes:
        record = json.loads(raw)
        record["round"] = "3"
        record["hash"] = record_hash(record)
        return _encode(record)

    _rewrite(path, 3, forge)
    with pytest.raises(LedgerError, match="line 4 holds a bad value: round"):
        Ledger(path)


def test_a_ledger_in_a_missing_directory_is_a_ledger_error(tmp_path):
    with pytest.raises(LedgerError, match="cannot lock"):
        Ledger(ledger_path(tmp_path / "absent"), 3.0, DELTA)
