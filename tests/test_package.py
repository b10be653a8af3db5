"""The package as a whole: no deserialization holes, a small honest public face, light imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import fednb

PACKAGE = Path(fednb.__file__).parent

# what would let bytes from a peer or a file become arbitrary objects
FORBIDDEN = re.compile(
    r"\bimport\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b|\bfrom\s+(c?pickle|dill|cloudpickle|shelve|marshal)\s+import"
    r"|recv_pyobj|send_pyobj|recv_serialized|weights_only\s*=\s*False|allow_pickle\s*=\s*True|\bpickle\.loads?\b"
    r"|\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)"
)


def test_no_pickle_anywhere_in_the_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix not in (".py", ".js", ".ts") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "deserialization of untrusted data:\n" + "\n".join(offenders)


def test_the_pickle_check_would_catch_each_form():
    for line in ["import pickle", "import cloudpickle as cp", "from dill import loads", "sock.recv_pyobj()",
                 "torch.load(f, weights_only=False)", "torch.load(f)", "np.load(f, allow_pickle=True)"]:
        assert FORBIDDEN.search(line), line
    assert not FORBIDDEN.search("torch.load(f, weights_only=True)")


def test_public_api_is_small_sorted_and_real():
    names = fednb.__all__
    assert names == sorted(names) and len(names) <= 16
    for name in names:
        assert hasattr(fednb, name), name
    assert (PACKAGE / "py.typed").exists()


def test_importing_fednb_stays_light():
    """`import fednb` must not pull in torch, IPython or widgets: parties and CLIs start fast."""
    code = "import sys, fednb; print(','.join(m for m in ('torch', 'IPython', 'ipywidgets', 'pandas') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"import fednb loaded: {loaded}"


def test_a_party_process_does_not_import_the_coordinator():
    """The party's modules (its server, CLI entry, worker) load without fednb.federation or fednb.sim."""
    code = ("import sys, fednb, fednb.party.server, fednb.party.host, fednb.party.worker; "
            "print(','.join(m for m in ('fednb.federation', 'fednb.sim', 'fednb.notebook') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"a party process loaded: {loaded}"


def test_the_readme_python_quickstart_runs():
    """The first Python block of the README, exactly as a user would paste it."""
    text = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    block = block.replace("rounds=15", "rounds=3")  # the same code, fewer rounds
    done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    accuracy = float(done.stdout.splitlines()[0])
    assert 0.5 < accuracy <= 1.0
    assert "party-3" in done.stdout


def test_the_package_type_checks():
    """`mypy fednb`: the typed public API (py.typed) holds up."""
    done = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary",
                           "--cache-dir", str(PACKAGE.parent / ".mypy_cache"), str(PACKAGE)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

