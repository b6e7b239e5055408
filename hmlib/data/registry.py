"""Dataset registry: the five built-in datasets and any added through ``cfg.data.custom_datasets``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hmlib import paths
from hmlib.errors import HmlibError
from hmlib.config import DataConfig


class DatasetError(HmlibError, ValueError):
    """A dataset name is unknown or none of its sources could be read (the message says how to fix it)."""


HUB_IDS: dict[str, str] = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "kmnist": "tanganke/kmnist",
    "hebrew_chars": "sivan22/hebrew-handwritten-characters",
    "math_shapes": "prithivMLmods/Math-Shapes",
}

# A dataset or split name becomes a folder / file name under data_cache/ (and a folder under the mirror).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

# Datasets without an offline copy in the project's mirror; the error message says so.
HUB_ONLY = {"kmnist": "no offline copy of KMNIST exists here (see ../shared/data/README.md); it loads from the hub only"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset can come from: a hub id and/or a local folder."""

    name: str
    hub_id: str | None = None
    local_dir: Path | None = None  # a folder of {train,test}.parquet or an image folder (custom datasets)


def repo_relative(value: str | Path) -> Path:
    """A user-given folder as an absolute path; a relative one is taken from the repository root, not the cwd."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else paths.REPO_ROOT / path).resolve()


def _looks_like_path(value: str) -> bool:
    """A local folder (starts with /, . or ~, or exists) rather than a hub id such as 'org/name'."""
    return value.startswith(("/", ".", "~")) or repo_relative(value).exists()


def check_name(name: object, what: str = "dataset name") -> str:
    """``name`` if it is safe as a single file name (letters, digits, '_', '-', '.'; no '..'), else DatasetError."""
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name) and ".." not in name:
        return name
    raise DatasetError(f"invalid {what} {name!r}: use up to 100 letters, digits, '_', '-' or '.', starting with a "
                       "letter or digit and without '..' (it becomes a folder name; a path is not a name: register "
                       "a local folder under data.custom_datasets as {\"<name>\": \"<folder>\"})")


def custom_datasets(cfg: DataConfig) -> dict[str, str]:
    """``cfg.custom_datasets`` as ``{name: hub id or local folder}``, every name checked and every value non-empty."""
    custom = {}
    for name, value in dict(cfg.custom_datasets).items():
        custom[check_name(name, "custom dataset name")] = str(value)
        if not str(value).strip():
            raise DatasetError(f"data.custom_datasets['{name}'] is empty; give a hub id ('org/name') or a local folder")
    return custom


def get_spec(name: str, cfg: DataConfig) -> DatasetSpec:
    """Look a dataset up by name: built-in first, then ``cfg.custom_datasets`` (hub id or local folder)."""
    check_name(name)
    custom = custom_datasets(cfg)
    if name in custom:
        value = custom[name]
        if _looks_like_path(value):
            return DatasetSpec(name=name, local_dir=repo_relative(value))
        return DatasetSpec(name=name, hub_id=value)
    if name in HUB_IDS:
        return DatasetSpec(name=name, hub_id=HUB_IDS[name])
    known = sorted(set(HUB_IDS) | set(custom))
    raise DatasetError(f"unknown dataset '{name}'; registered: {', '.join(known)}. Add others in the config under "
                       "data.custom_datasets as {\"<name>\": \"<hub id or local folder>\"}")


def dataset_names(cfg: DataConfig) -> list[str]:
    """All registered dataset names (built-in, then custom)."""
    return list(dict.fromkeys(list(HUB_IDS) + list(custom_datasets(cfg))))
