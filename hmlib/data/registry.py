"""Dataset registry: the five built-in datasets and any added through ``cfg.data.custom_datasets``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hmlib import paths
from hmlib.config import DataConfig


class DatasetError(ValueError):
    """A dataset name is unknown or none of its sources could be read (the message says how to fix it)."""


HUB_IDS: dict[str, str] = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "kmnist": "tanganke/kmnist",
    "hebrew_chars": "sivan22/hebrew-handwritten-characters",
    "math_shapes": "prithivMLmods/Math-Shapes",
}

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


def get_spec(name: str, cfg: DataConfig) -> DatasetSpec:
    """Look a dataset up by name: built-in first, then ``cfg.custom_datasets`` (hub id or local folder)."""
    custom = dict(cfg.custom_datasets)
    if name in custom:
        value = str(custom[name])
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
    return list(dict.fromkeys(list(HUB_IDS) + list(cfg.custom_datasets)))
