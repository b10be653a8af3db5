"""The magics in a real kernel, driven as a front end drives it: Stop button and interrupt mid-training."""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest
from jupyter_client import KernelManager

from tests.jupyter_fixtures import jupyter_environment

SLOW_ROUNDS = "%%fed_train --rounds 200 --lr 0.01\nimport time\ntime.sleep(0.15)\nreport(slept=1)\n"


class Kernel:
    """A real IPython kernel (this venv) and a client speaking the Jupyter protocol to it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def execute(self, code: str, *, timeout: float = 120, on_iopub: Any = None) -> dict[str, Any]:
        """Run ``code``; call ``on_iopub(msg)`` for each output message; return the execute_reply."""
        msg_id = self.client.execute(code)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                msg = None
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id and on_iopub is not None:
                on_iopub(msg)
            try:
                reply = self.client.get_shell_msg(timeout=0.01)
            except queue.Empty:
                reply = None
            if reply is not None and reply["parent_header"].get("msg_id") == msg_id:
                self._drain(msg_id, on_iopub)
                return reply
            assert time.monotonic() < deadline, f"no reply to {code[:40]!r} within {timeout} s"

    def _drain(self, msg_id: str, on_iopub: Any) -> None:
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=0.3)
            except queue.Empty:
                return
            if msg["parent_header"].get("msg_id") == msg_id and on_iopub is not None:
                on_iopub(msg)

    def value(self, expression: str) -> Any:
        reply = self.client.execute_interactive(f"print(repr({expression}))", timeout=30, output_hook=self._capture)
        assert reply["content"]["status"] == "ok"
        return eval(self._captured.pop())  # noqa: S307 - our own repr of ints and strings

    _captured: list[str] = []

    def _capture(self, msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            self._captured.append(msg["content"]["text"].strip())

    def stop(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    k = Kernel(jupyter_environment(tmp_path_factory.mktemp("jupyter")))
    try:
        reply = k.execute("%load_ext fednb\n%fed_sim 2 --dataset digits --partition iid")
        assert reply["content"]["status"] == "ok"
        reply = k.execute("%%fed_model\nimport torch.nn as nn\n"
                          "model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))")
        assert reply["content"]["status"] == "ok"
        yield k
    finally:
        k.execute("%fed_close")
        k.stop()


def test_the_dashboards_stop_button_ends_a_foreground_run(kernel):
    """The cell is still running when the front end's Stop message arrives: it must be handled."""
    before = kernel.value("len(fed.history)")
    seen: dict[str, Any] = {}

    def on_iopub(msg: dict[str, Any]) -> None:
        content = msg["content"]
        if msg["msg_type"] == "comm_open" and "_esm" in str(content.get("data", {}).get("state", {}).keys()):
            seen.setdefault("comm", content["comm_id"])
        if msg["msg_type"] == "comm_msg" and content.get("comm_id") == seen.get("comm"):
            state = content["data"].get("state", {})
            if state.get("rounds_done", 0) >= 2 and "sent" not in seen:
                seen["sent"] = time.monotonic()
                kernel.client.session.send(kernel.client.shell_channel.socket, "comm_msg", {
                    "comm_id": seen["comm"], "data": {"method": "custom", "content": {"type": "stop"}}})
            if state.get("state"):
                seen["state"] = state["state"]

    reply = kernel.execute(SLOW_ROUNDS, on_iopub=on_iopub)
    assert reply["content"]["status"] == "ok"
    assert "sent" in seen, "no dashboard updates arrived while the cell ran"
    trained = kernel.value("len(fed.history)") - before
    assert 2 <= trained < 10 and seen["state"] == "stopped"
    assert time.monotonic() - seen["sent"] < 5


def test_an_interrupt_stops_training_after_the_round_in_progress(kernel):
    before = kernel.value("len(fed.history)")
    rounds: list[int] = []

    def on_iopub(msg: dict[str, Any]) -> None:
        state = msg["content"].get("data", {}).get("state", {}) if msg["msg_type"] == "comm_msg" else {}
        if state.get("rounds_done", 0) >= 2 and not rounds:
            rounds.append(state["rounds_done"])
            kernel.manager.interrupt_kernel()

    kernel.execute(SLOW_ROUNDS.replace("%%fed_train", "%%fed_train --model model"), on_iopub=on_iopub)
    assert rounds, "training never got going"
    deadline = time.monotonic() + 10
    while kernel.value("fed.training") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kernel.value("fed.training") is False
    trained = kernel.value("len(fed.history)") - before
    assert 2 <= trained < 10
    # the model holds the last completed round's weights, and the kernel is usable
    reply = kernel.execute("%fed_eval")
    assert reply["content"]["status"] == "ok"


def test_a_mistake_in_an_awaited_fed_train_is_still_a_one_line_usage_error(kernel):
    outputs: list[dict[str, Any]] = []
    reply = kernel.execute("%fed_train --rounds 0", on_iopub=outputs.append)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "UsageError"
    shown = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    assert "rounds must be a positive integer" in shown and "Traceback" not in shown
    assert not [m for m in outputs if m["msg_type"] == "error"]  # no traceback block either


def shown_text(outputs: list[dict[str, Any]]) -> str:
    """Everything a cell showed as text: its streams, error outputs and displays' text/plain."""
    parts = []
    for msg in outputs:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            parts.append(content["text"])
        elif msg["msg_type"] == "error":
            parts.append(f"{content['ename']}: {content['evalue']}")
        elif msg["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            parts.append(content.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_a_failed_foreground_fed_train_shows_its_error_once(kernel):
    outputs: list[dict[str, Any]] = []
    reply = kernel.execute("%%fed_train --rounds 1   # fails at every party\nraise RuntimeError('no GPU here')\n",
                           on_iopub=outputs.append)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "UsageError"
    shown = shown_text(outputs)
    assert shown.count("only 0 of 2 parties replied") == 1, shown
    assert "background" not in shown and "Traceback" not in shown
    assert "see the error below" in shown  # the dashboard's final summary points at it
    # each party's reason is in its dashboard row, not repeated as log lines
    assert "party-0 dropped" not in "".join(m["content"].get("text", "") for m in outputs)


def test_magic_lines_in_a_kernel_take_trailing_comments(kernel):
    outputs: list[dict[str, Any]] = []
    reply = kernel.execute("%fed_parties   # or: %fed_connect parties.toml --key ~/.fednb/me\n"
                           "%fed_train --rounds 1 --lr 0.05   # or: --lr 0.1\n", on_iopub=outputs.append)
    assert reply["content"]["status"] == "ok", shown_text(outputs)
    reply = kernel.execute("%%fed_run -o tags   # runs at every party\n'#' + 'x'\n")
    assert reply["content"]["status"] == "ok"
    assert kernel.value("sorted(tags.values())") == ["#x", "#x"]
