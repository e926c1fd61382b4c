"""Readers for the real text data sets (placeholder; filled in below)."""

from __future__ import annotations

import os
import pathlib

DATA_DIR_ENV = "ULMFIT_DATA_DIR"


def data_dir() -> pathlib.Path:
    """The shared data folder: `$ULMFIT_DATA_DIR`, else `../shared/data` relative to the repository root."""
    if os.environ.get(DATA_DIR_ENV):
        return pathlib.Path(os.environ[DATA_DIR_ENV])
    return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
