"""Reading the report commands' input tables: one line naming the option when a file is not usable.

``dpbr aggregate``, ``dpbr plot``, ``dpbr vn-report`` and ``dpbr reconstruct-report`` read Parquet
files a user points them at. A file that cannot be read (missing, empty, truncated, not Parquet) or
that is valid Parquet of another kind (other columns, text where numbers belong, no rows) is refused
here, before anything is written, with a :class:`~dpbr.errors.UsageError` naming the option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dpbr.errors import UsageError

__all__ = ["read_frame", "read_table", "read_train_final"]


def _number_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)


def _text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t) or pa.types.is_null(t)


def read_table(path: str | Path, option: str, what: str, *, required: Iterable[str] = (),
               numbers: Iterable[str] = (), texts: Iterable[str] = (), allow_empty: bool = False) -> pa.Table:
    """The Parquet file ``path`` as an Arrow table (schema metadata dropped), checked for use as ``what``.

    Parameters
    ----------
    path, option:
        The file and the option (or argument) that named it, for the message.
    what:
        What the file should be, e.g. ``"a dpbr train cell file"`` (used in the message).
    required:
        Columns that must be present.
    numbers, texts:
        Columns (among the required ones) that must hold numbers (integers, floats, booleans, or only nulls) or
        text (strings, or only nulls).
    allow_empty:
        Whether a table without rows is acceptable.

    Raises
    ------
    UsageError
        The file is missing or unreadable, a column is missing or of the wrong type, or it has no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(option, f"{str(p)!r} does not exist or is not a file")
    try:
        table = pq.read_table(p).replace_schema_metadata(None)
    except (OSError, pa.ArrowException, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise UsageError(option, f"cannot read {str(p)!r} as Parquet ({detail}); expected {what}") from None
    names = set(table.column_names)
    for col in required:
        if col not in names:
            raise UsageError(option, f"{str(p)!r} is not {what}: column {col!r} is missing")
    schema = table.schema
    for col in numbers:
        if col in names and not _number_type(schema.field(col).type):
            raise UsageError(option, f"{str(p)!r} is not {what}: column {col!r} holds {schema.field(col).type}, "
                                      "expected numbers")
    for col in texts:
        if col in names and not _text_type(schema.field(col).type):
            raise UsageError(option, f"{str(p)!r} is not {what}: column {col!r} holds {schema.field(col).type}, "
                                      "expected text")
    if not allow_empty and table.num_rows == 0:
        raise UsageError(option, f"{str(p)!r} has no rows; expected {what}")
    return table


def read_frame(path: str | Path, option: str, what: str, **checks: object) -> pd.DataFrame:
    """:func:`read_table` as a pandas DataFrame."""
    return read_table(path, option, what, **checks).to_pandas()  # type: ignore[arg-type]


_FINAL_TEXTS = ("dataset", "model", "privacy", "pair", "gar", "attack")


def read_train_final(path: str | Path, required: Iterable[str]) -> pd.DataFrame:
    """The training grid's final-accuracy table given with ``--train-final`` (``dpbr aggregate``'s
    ``final_accuracy.parquet``), with the ``required`` columns checked."""
    if not Path(path).exists():
        raise UsageError("--train-final", f"{str(path)!r} does not exist; run `dpbr aggregate` first")
    cols = tuple(required)
    return read_frame(path, "--train-final", "the final-accuracy table of `dpbr aggregate` (final_accuracy.parquet)",
                      required=cols, texts=[c for c in cols if c in _FINAL_TEXTS],
                      numbers=[c for c in cols if c not in _FINAL_TEXTS], allow_empty=True)
