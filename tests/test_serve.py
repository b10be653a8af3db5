"""%fed_serve in a real kernel: a party in the owner's notebook, its request approved with the widget."""

from __future__ import annotations

import json
import os
import queue
import threading
import time

import numpy as np
import pytest

import fednb
from fednb.party.policy import request_code
from tests.jupyter_fixtures import jupyter_environment

jupyter_client = pytest.importorskip("jupyter_client")


@pytest.fixture
def kernel(tmp_path):
    """A fresh ipykernel of this venv, shut down (and its processes with it) at the end."""
    from jupyter_client.manager import start_new_kernel

    saved = dict(os.environ)
    os.environ.update(jupyter_environment(tmp_path / "jupyter"))
    try:
        manager, client = start_new_kernel(kernel_name="python3", startup_timeout=60)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def execute(client, code: str, timeout: float = 60.0) -> list[dict]:
    """Run ``code``; return the iopub messages it produced (raises on an error in the cell)."""
    msg_id = client.execute(code)
    messages = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if message["parent_header"].get("msg_id") != msg_id:
            messages.append(message)  # widget updates from the watcher thread belong to no cell
            continue
        messages.append(message)
        if message["msg_type"] == "error":
            raise AssertionError("\n".join(message["content"]["traceback"]))
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            return messages
    raise AssertionError(f"the cell did not finish within {timeout} s")


def comm_states(messages: list[dict]) -> list[tuple[str, dict]]:
    found = []
    for message in messages:
        if message["msg_type"] in ("comm_open", "comm_msg"):
            data = message["content"].get("data") or {}
            if isinstance(data.get("state"), dict):
                found.append((message["content"]["comm_id"], data["state"]))
    return found


def test_the_approvals_widget_approves_a_request_in_a_real_kernel(kernel, tmp_path, private_dir, digits_parts):
    npz = tmp_path / "clinic.npz"
    np.savez(npz, x=digits_parts[1].x_train, y=digits_parts[1].y_train)
    directory = tmp_path / "clinic"
    endpoint = f"ipc://{private_dir}/clinic.sock"
    opened = execute(kernel, "\n".join([
        "%load_ext fednb",
        f"widget = %fed_serve --name clinic --listen {endpoint} --data train={npz} --dir {directory}",
        "display(widget)",
    ]))
    (comm_id,) = {cid for cid, state in comm_states(opened) if state.get("party") == "clinic"}
    try:
        with fednb.connect([{"name": "clinic", "endpoint": endpoint}], heartbeat=0.2, heartbeat_timeout=2.0) as fed:
            results: dict[str, object] = {}
            asking = threading.Thread(target=lambda: results.update(fed.run("len(train.dataset)", timeout=90)))
            asking.start()
            code = request_code("run", {"source": "len(train.dataset)"}).hash
            # the widget's pending list shows the request: its code, who asked, what it returns
            shown = None
            deadline = time.monotonic() + 60
            while shown is None and time.monotonic() < deadline:
                try:
                    message = kernel.get_iopub_msg(timeout=1)
                except queue.Empty:
                    continue
                for cid, state in comm_states([message]):
                    rows = state.get("pending") or []
                    if cid == comm_id and rows and rows[0]["hash"] == code:
                        shown = rows[0]
            assert shown is not None, "the request never appeared in the widget"
            assert shown["code"]["cell"] == "len(train.dataset)" and shown["kind"] == "run"
            assert "numbers" in shown["returns"] and shown["coordinator"] == "local"
            assert asking.is_alive()  # it waits for the owner

            # the Approve button: the front end sends this custom message on the widget's comm
            click = kernel.session.msg("comm_msg", {"comm_id": comm_id, "data": {
                "method": "custom", "content": {"action": "approve", "hash": code, "rounds": None}}})
            kernel.shell_channel.send(click)
            asking.join(60)
            assert results["clinic"] == len(digits_parts[1].y_train) - round(len(digits_parts[1].y_train) * 0.2)

            # the widget now shows nothing pending and the decision; a bad message is an error shown, not a crash
            bad = kernel.session.msg("comm_msg", {"comm_id": comm_id, "data": {
                "method": "custom", "content": {"action": "approve", "hash": "not-a-hash"}}})
            kernel.shell_channel.send(bad)
            after = execute(kernel, "import json; print(json.dumps([widget.pending, widget.decided, widget.error]))")
            printed = [m["content"]["text"] for m in after if m["msg_type"] == "stream"]
            pending, decided, error = json.loads(printed[-1])
            assert pending == [] and decided[-1].startswith(f"approved {code[:12]}") and "64 lowercase hex" in error
        # unloading the extension stops the party this kernel serves
        gone = execute(kernel, "%unload_ext fednb\nprint(widget.server.stopped.wait(10))")
        assert [m["content"]["text"].strip() for m in gone if m["msg_type"] == "stream"][-1] == "True"
    finally:
        execute(kernel, "widget.server.stop()")
