"""The dataset manifest: one CSV per dataset, paths relative to the CSV, an explicit seeded split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from dataset.io import atomic_write_text

REQUIRED_COLUMNS = ("subject_id", "ct", "ap", "lat", "label", "split")
PATH_COLUMNS = ("ct", "ap", "lat")
SPLITS = ("train", "val", "test")
# extra columns whose values all end like this hold files (e.g. ``latent``) and are resolved too
_FILE_PATTERN = r"\.(?:pt|pth|npy|npz|nii|nii\.gz|h5|png|json)$"


def is_plain_name(name: str) -> bool:
    """Whether ``name`` can name a file inside a folder: no path separators, not hidden, not ``.`` / ``..``."""
    return bool(name) and not any(c in name for c in "/\\\0") and not name.startswith(".")


def split_fractions(fractions) -> np.ndarray:
    """``(train, val, test)`` fractions normalised to sum 1, else ``ValueError`` (three finite non-negative numbers
    with a positive sum are expected)."""
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or not np.isfinite(f).all() or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"split fractions {tuple(f.ravel().tolist())!r} are invalid; expected three non-negative "
                         "numbers with a positive sum")
    return f / f.sum()


def assign_splits(subject_ids: list[str], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  existing: dict[str, str] | None = None) -> dict[str, str]:
    """Seeded train/val/test assignment that never moves a subject once it has a split.

    New subjects (sorted, then shuffled with ``seed``) fill whichever split is furthest below its
    target fraction, so a fresh dataset of ``n >= 3`` subjects gets at least one per split when all
    fractions are positive.

    Args:
        subject_ids: every subject that needs a split.
        seed: shuffle seed.
        fractions: target ``(train, val, test)`` fractions (normalised to sum 1).
        existing: splits already written (kept as they are).
    """
    f = split_fractions(fractions)
    out = {k: v for k, v in (existing or {}).items() if k in set(subject_ids)}
    new = sorted(set(subject_ids) - set(out))
    order = np.random.default_rng(seed).permutation(len(new))
    counts = np.array([sum(v == s for v in out.values()) for s in SPLITS], dtype=float)
    n_total = len(subject_ids)
    for i in order:
        # a fresh tiny dataset still gets one val and one test subject before anything else
        empty = [k for k in (1, 2, 0) if counts[k] == 0 and f[k] > 0] if n_total >= 3 else []
        k = empty[0] if empty else int(np.argmax(f * (counts.sum() + 1) - counts))
        out[new[i]] = SPLITS[k]
        counts[k] += 1
    return out


class Manifest:
    """A validated manifest: a DataFrame with absolute paths, and the CSV it came from.

    Columns: ``subject_id, ct, ap, lat, label, split`` (+ any extra, e.g. ``latent``). Path columns
    (the three above and every extra whose values end in a file suffix) are stored relative to the CSV
    and resolved to absolute paths on load.
    """

    def __init__(self, frame: pd.DataFrame, path: Path) -> None:
        self.frame = frame
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, check_files: bool = True) -> "Manifest":
        """Read and validate a manifest CSV.

        Raises:
            FileNotFoundError: the CSV is missing.
            ValueError: missing columns, empty or duplicate subject ids, unknown splits, non-integer
                labels, or (with ``check_files``) listed files that do not exist; the message names
                the CSV and the problem.
        """
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such manifest; expected a CSV with columns {', '.join(REQUIRED_COLUMNS)}")
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as e:
            raise ValueError(f"{path}: cannot be read as CSV ({type(e).__name__}: {e})") from e
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {list(REQUIRED_COLUMNS)}")
        if len(frame) == 0:
            raise ValueError(f"{path}: manifest has no rows")
        ids = frame["subject_id"]
        if (ids.str.strip() == "").any():
            raise ValueError(f"{path}: empty subject_id in rows {list(frame.index[ids.str.strip() == ''] + 2)}")
        unsafe = [sid for sid in ids if not is_plain_name(sid)]
        if unsafe:
            raise ValueError(f"{path}: subject ids {unsafe[:5]} are invalid; expected plain names (no '/', '\\', "
                             "'..' or leading '.'), since outputs are named after them")
        dup = sorted(set(ids[ids.duplicated()]))
        if dup:
            raise ValueError(f"{path}: duplicate subject ids {dup[:5]}")
        bad_split = sorted(set(frame["split"]) - set(SPLITS))
        if bad_split:
            raise ValueError(f"{path}: unknown split values {bad_split}; expected {list(SPLITS)}")
        try:
            frame["label"] = frame["label"].astype(int)
        except ValueError as e:
            raise ValueError(f"{path}: label column holds non-integers ({e})") from e
        path_columns = list(PATH_COLUMNS) + [
            c for c in frame.columns if c not in REQUIRED_COLUMNS and frame[c].str.contains(_FILE_PATTERN).all()
        ]
        for col in path_columns:
            frame[col] = [str((path.parent / p).resolve()) if p else "" for p in frame[col]]
            if check_files:
                absent = [(sid, p) for sid, p in zip(frame["subject_id"], frame[col]) if not p or not Path(p).exists()]
                if absent:
                    sid, p = absent[0]
                    raise ValueError(
                        f"{path}: column '{col}' lists {len(absent)} missing files, e.g. subject {sid}: {p or '(empty)'}"
                    )
        return cls(frame.reset_index(drop=True), path)

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split (``train``, ``val`` or ``test``), absolute paths."""
        if name not in SPLITS:
            raise ValueError(f"split={name!r} is invalid; expected one of {SPLITS}")
        return self.frame[self.frame["split"] == name].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.frame)

    @staticmethod
    def write(frame: pd.DataFrame, path: str | os.PathLike) -> None:
        """Write a manifest atomically, turning absolute paths under the CSV's folder into relative ones.

        Args:
            frame: at least the required columns; path columns may be absolute or relative to ``path``.
            path: destination CSV.
        """
        path = Path(path).resolve()
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"manifest for {path} lacks columns {missing}")
        out = frame.copy()
        for col in out.columns:
            if col in PATH_COLUMNS or (col not in REQUIRED_COLUMNS and out[col].astype(str).str.contains(_FILE_PATTERN).all()):
                out[col] = [_relative(p, path.parent) for p in out[col].astype(str)]
        cols = list(REQUIRED_COLUMNS) + [c for c in out.columns if c not in REQUIRED_COLUMNS]
        atomic_write_text(path, out[cols].to_csv(index=False))


def _relative(p: str, root: Path) -> str:
    q = Path(p)
    if not q.is_absolute():
        return q.as_posix()
    return Path(os.path.relpath(q.resolve(), root)).as_posix()
