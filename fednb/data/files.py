"""Reading a party's own training data from ``.npz`` or ``.csv`` files, without pickle.

A data owner registers files such as ``--data train=clinic_a.npz``; this module turns
them into ``(x, y, ids)`` arrays or refuses them with a :class:`~fednb.errors.DataError`
that names the file (and, for CSV, the line and column) at fault. Sizes are checked
against the array headers before anything is allocated.

A table of a vertical federation carries an id column (``id_column=``): each row's id is
kept, canonicalised as private set intersection hashes it
(:func:`fednb.privacy.psi.canonical_ids`: integers as decimal text, strings as UTF-8), in a
numpy bytes array (``S<k>``). Missing, duplicate and float ids are refused. Such a table
may hold no label: the party is then a *feature party* (``y`` is ``None``).
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fednb.errors import DataError

__all__ = ["id_array", "load_file"]

_DEFAULT_MAX_BYTES = 2 * 1024**3

Loaded = tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def load_file(
    path: str | os.PathLike[str], *, label: str | None = None, id_column: str | None = None,
    max_bytes: int = _DEFAULT_MAX_BYTES,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read ``(x, y, ids)`` from a ``.npz`` or ``.csv`` file.

    ``.npz`` must hold an array ``x`` (numeric, at least 2-D) and may hold ``y`` (1-D;
    ``label`` names another array to use as ``y``) and ``ids`` (1-D integers or strings).
    ``.csv`` needs a header row: ``label`` names the label column, ``id_column`` the id
    column (read as text), and every other column becomes a feature. ``x`` comes back
    float32; ``y`` int64 for integer labels, float32 otherwise (regression), or ``None``;
    ``ids`` an ``S<k>`` array of canonical ids, or ``None`` for a table without ids.

    ``id_column`` makes the ids required (in an ``.npz``: the array ``ids``, or one named
    ``id_column``) and the label optional: a table with ids but without the label column is
    a feature party's. A table without ids needs its label. Files over ``max_bytes`` (on
    disk, or once decompressed) are refused.
    """
    p = Path(path)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
    if id_column is not None and (not isinstance(id_column, str) or not id_column):
        raise ValueError(f"id_column must be a column name, got {id_column!r}")
    if label is not None and label == id_column:
        raise ValueError(f"the label and the id column are both {label!r}; they must be different columns")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise DataError(f"{p}: cannot read data file ({exc.strerror or exc})") from exc
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    if size > max_bytes:
        raise DataError(f"{p}: file is {size} bytes, over the limit of {max_bytes} bytes")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _load_npz(p, label, id_column, max_bytes)
    if suffix == ".csv":
        if label is None and id_column is None:
            raise DataError(f"{p}: a CSV file needs label=<name of the label column> "
                            "(or id_column=<name of the id column>, for a feature party of a vertical federation)")
        return _load_csv(p, label, id_column)
    raise DataError(f"{p}: unsupported file type {suffix or '(none)'!r}; use .npz or .csv")


def id_array(values: Sequence[object], source: str, locate: Callable[[int], str]) -> np.ndarray:
    """Ids as an ``S<k>`` array of their canonical bytes; a DataError names ``source``, ``locate(row)`` and the value.

    Missing ids (None, NaN, empty), floats (``1.5``, or text such as ``"1.0"``, which would meet
    ``1`` at no party), booleans, NUL characters and duplicates are refused.
    """
    from fednb.privacy.psi import canonical_ids

    seen: dict[bytes, int] = {}
    for row, value in enumerate(values):
        if isinstance(value, (str, bytes)):  # numpy's str_ and bytes_ too
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if not text.strip() or text.strip().lower() == "nan":
                raise DataError(f"{source}, {locate(row)}: missing id ({text!r})")
            if "\x00" in text:
                raise DataError(f"{source}, {locate(row)}: id {text!r} holds a NUL character")
            if _is_number(text) and not _is_integer(text):
                raise DataError(f"{source}, {locate(row)}: id {text!r} is a float; ids are integers or strings")
            key = bytes(value) if isinstance(value, bytes) else text.encode("utf-8")
        elif isinstance(value, (bool, np.bool_)):
            raise DataError(f"{source}, {locate(row)}: id {value!r} is a boolean; ids are integers or strings")
        elif isinstance(value, (int, np.integer)):
            key = str(int(value)).encode()
        elif value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            raise DataError(f"{source}, {locate(row)}: missing id")
        elif isinstance(value, (float, np.floating)):
            raise DataError(f"{source}, {locate(row)}: id {value!r} is a float; ids are integers or strings")
        else:
            raise DataError(f"{source}, {locate(row)}: id {value!r} is a {type(value).__name__}; "
                            "ids are integers or strings")
        if key in seen:
            raise DataError(f"{source}, {locate(row)}: duplicate id {key.decode('utf-8', 'replace')!r} "
                            f"(also at {locate(seen[key])}); ids must be unique")
        seen[key] = row
    try:
        canonical = canonical_ids(values)  # the bytes private set intersection hashes
    except ValueError as exc:  # unreachable after the checks above, which refuse all it refuses
        raise DataError(f"{source}: {exc}") from exc
    width = max((len(c) for c in canonical), default=1)
    return np.array(canonical, dtype=f"S{max(1, width)}")


def _read_member(archive: zipfile.ZipFile, name: str, path: Path, budget: int) -> np.ndarray:
    """Read one ``.npy`` member after checking its header: dtype, shape and size."""
    with archive.open(f"{name}.npy") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise DataError(f"{path}: array {name!r} is not a valid .npy array ({exc})") from exc
        if dtype.hasobject:
            raise DataError(
                f"{path}: array {name!r} is an object array, which would need pickle to load; "
                "fednb never unpickles data files (save plain numeric arrays)"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > budget:
            raise DataError(f"{path}: arrays would take over the limit of {budget} bytes in memory")
    with archive.open(f"{name}.npy") as f:
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{path}: array {name!r} cannot be read ({exc})") from exc


def _load_npz(path: Path, label: str | None, id_column: str | None, max_bytes: int) -> Loaded:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a valid .npz archive ({exc})") from exc
    with archive:
        names = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
        held = ", ".join(map(repr, names)) or "no arrays"
        y_name = "y" if label is None else label
        id_name = id_column if id_column is not None and id_column in names else "ids"
        if id_column is not None and id_name not in names:
            raise DataError(f"{path}: missing array 'ids' (the row ids, for the id column {id_column!r}); the archive "
                            f"holds {held} (save with np.savez(path, x=..., ids=...))")
        has_ids = id_name in names
        missing = [n for n in ("x", y_name) if n not in names and (n == "x" or not has_ids)]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {', '.join(map(repr, missing))}; the archive holds "
                f"{held} (save with np.savez(path, x=..., {y_name}=...))"
            )
        x = _read_member(archive, "x", path, max_bytes)
        ids = _read_member(archive, id_name, path, max_bytes - x.nbytes) if has_ids else None
        left = max_bytes - x.nbytes - (ids.nbytes if ids is not None else 0)
        y = _read_member(archive, y_name, path, left) if y_name in names else None
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{path}: x must be at least 2-D [samples, features], got shape {x.shape}")
    if y is not None and y.ndim != 1:
        raise DataError(f"{path}: {y_name} must be 1-D [samples], got shape {y.shape}")
    if y is not None and x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: x has {x.shape[0]} samples but {y_name} has {y.shape[0]}")
    canonical = None
    if ids is not None:
        if ids.ndim != 1:
            raise DataError(f"{path}: {id_name} must be 1-D [samples], got shape {ids.shape}")
        if ids.shape[0] != x.shape[0]:
            raise DataError(f"{path}: x has {x.shape[0]} samples but {id_name} has {ids.shape[0]}")
        if ids.dtype.kind not in "biufUS":
            raise DataError(f"{path}: {id_name} must hold integers or strings, got dtype {ids.dtype}")
        canonical = id_array(ids.tolist(), str(path), lambda row: f"array {id_name!r}, row {row}")
    with np.errstate(over="ignore"):
        xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        bad = np.argwhere(~np.isfinite(xf))[0]
        raise DataError(
            f"{path}: x has a non-finite value (NaN, infinite or too large for float32) "
            f"at index {tuple(int(i) for i in bad)}"
        )
    return xf, None if y is None else _labels(y, f"{path}: {y_name}"), canonical


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer labels as int64; anything else numeric as float32 regression targets."""
    if y.dtype.kind in "biu":
        return y.astype(np.int64)
    if y.dtype.kind != "f":
        raise DataError(f"{where} must be numeric labels, got dtype {y.dtype}")
    with np.errstate(over="ignore"):
        yf = y.astype(np.float32)
    if not np.isfinite(yf).all():
        raise DataError(
            f"{where} has a non-finite value (NaN, infinite or too large for float32) "
            f"at index {int(np.argmin(np.isfinite(yf)))}"
        )
    return yf


def _load_csv(path: Path, label: str | None, id_column: str | None) -> Loaded:
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    with f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file; a header row is required") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}, line 1: cannot parse CSV ({exc})") from exc
        if all(_is_number(h) for h in header):
            raise DataError(
                f"{path}, line 1: the first row looks like data; a header row with column names is required"
            )
        key = _column(path, header, id_column, "id") if id_column is not None else None
        # a feature party's table (one with ids) has no label column, and need not
        target = None if label is None or (key is not None and label not in header) else \
            _column(path, header, label, "label")
        named = [c for c in (key, target) if c is not None]
        if len(header) <= len(named):
            raise DataError(f"{path}: no feature columns besides the "
                            + " and the ".join(f"{what} column {header[c]!r}" for what, c in
                                           (("id", key), ("label", target)) if c is not None))
        rows: list[list[float]] = []
        texts: list[str] = []
        lines: list[int] = []
        try:
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(row)} values but the header has {len(header)} columns"
                    )
                if key is not None:
                    texts.append(row[key].strip())
                    lines.append(reader.line_num)
                rows.append([_cell(cell, path, reader.line_num, header[j]) for j, cell in enumerate(row) if j != key])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}, line {reader.line_num}: cannot parse CSV ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    ids = None if key is None else id_array(texts, str(path), lambda row: f"line {lines[row]}, column {header[key]!r}")
    columns = [h for j, h in enumerate(header) if j != key]
    table = np.array(rows, dtype=np.float64)
    label_at = None if target is None else columns.index(header[target])
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(table if label_at is None else np.delete(table, label_at, axis=1), dtype=np.float32)
    if not np.isfinite(x).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
        column = [h for k, h in enumerate(columns) if k != label_at][j]
        raise DataError(f"{path}, data row {i + 1}, column {column!r}: value does not fit in float32")
    if label_at is None:
        return x, None, ids
    y = table[:, label_at]
    if np.all(y == np.round(y)) and np.all(np.abs(y) < 2**53):
        return x, y.astype(np.int64), ids
    return x, _labels(y, f"{path}: label column {label!r}"), ids


def _column(path: Path, header: list[str], name: str, what: str) -> int:
    """The index of the one column called ``name``; DataError when the header lacks it or repeats it."""
    if name not in header:
        raise DataError(f"{path}: no {what} column {name!r}; the header has {', '.join(map(repr, header))}")
    if header.count(name) > 1:
        raise DataError(f"{path}: {what} column {name!r} appears more than once in the header")
    return header.index(name)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _cell(text: str, path: Path, line: int, column: str) -> float:
    value = text.strip()
    if not value:
        raise DataError(f"{path}, line {line}, column {column!r}: empty cell (missing value)")
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{path}, line {line}, column {column!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise DataError(f"{path}, line {line}, column {column!r}: non-finite value {value!r}")
    return number
