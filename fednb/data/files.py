"""Reading a party's own training data from ``.npz`` or ``.csv`` files, without pickle.

A data owner registers files such as ``--data train=clinic_a.npz``; this module turns
them into ``(x, y)`` arrays or refuses them with a :class:`~fednb.errors.DataError`
that names the file (and, for CSV, the line and column) at fault. Sizes are checked
against the array headers before anything is allocated.
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from fednb.errors import DataError

__all__ = ["load_file"]

_DEFAULT_MAX_BYTES = 2 * 1024**3


def load_file(
    path: str | os.PathLike[str], *, label: str | None = None, max_bytes: int = _DEFAULT_MAX_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(x, y)`` from a ``.npz`` or ``.csv`` file.

    ``.npz`` must hold arrays ``x`` (numeric, at least 2-D) and ``y`` (1-D; ``label``
    names another array to use as ``y``). ``.csv`` needs a header row; ``label`` names
    the label column (required) and every other column becomes a feature. ``x`` comes
    back float32; ``y`` int64 for integer labels, float32 otherwise (regression).
    Files over ``max_bytes`` (on disk, or once decompressed) are refused.
    """
    p = Path(path)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
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
        x, y = _load_npz(p, "y" if label is None else label, max_bytes)
    elif suffix == ".csv":
        if label is None:
            raise DataError(f"{p}: a CSV file needs label=<name of the label column>")
        x, y = _load_csv(p, label)
    else:
        raise DataError(f"{p}: unsupported file type {suffix or '(none)'!r}; use .npz or .csv")
    return x, y


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


def _load_npz(path: Path, label: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a valid .npz archive ({exc})") from exc
    with archive:
        names = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
        missing = [n for n in ("x", label) if n not in names]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {', '.join(map(repr, missing))}; the archive holds "
                f"{', '.join(map(repr, names)) or 'no arrays'} (save with np.savez(path, x=..., {label}=...))"
            )
        x = _read_member(archive, "x", path, max_bytes)
        y = _read_member(archive, label, path, max_bytes - x.nbytes)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{path}: x must be at least 2-D [samples, features], got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{path}: {label} must be 1-D [samples], got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: x has {x.shape[0]} samples but {label} has {y.shape[0]}")
    with np.errstate(over="ignore"):
        xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        bad = np.argwhere(~np.isfinite(xf))[0]
        raise DataError(
            f"{path}: x has a non-finite value (NaN, infinite or too large for float32) "
            f"at index {tuple(int(i) for i in bad)}"
        )
    return xf, _labels(y, f"{path}: {label}")


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


def _load_csv(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
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
        if label not in header:
            raise DataError(f"{path}: no label column {label!r}; the header has {', '.join(map(repr, header))}")
        if header.count(label) > 1:
            raise DataError(f"{path}: label column {label!r} appears more than once in the header")
        if len(header) < 2:
            raise DataError(f"{path}: no feature columns besides the label column {label!r}")
        target = header.index(label)
        rows: list[list[float]] = []
        try:
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(row)} values but the header has {len(header)} columns"
                    )
                rows.append([_cell(cell, path, reader.line_num, header[j]) for j, cell in enumerate(row)])
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}, line {reader.line_num}: cannot parse CSV ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    table = np.array(rows, dtype=np.float64)
    y = table[:, target]
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(np.delete(table, target, axis=1), dtype=np.float32)
    if not np.isfinite(x).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
        column = [h for k, h in enumerate(header) if k != target][j]
        raise DataError(f"{path}, data row {i + 1}, column {column!r}: value does not fit in float32")
    if np.all(y == np.round(y)) and np.all(np.abs(y) < 2**53):
        return x, y.astype(np.int64)
    return x, _labels(y, f"{path}: label column {label!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
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
