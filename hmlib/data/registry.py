"""Dataset registry: the five built-in datasets, any added through ``cfg.data.custom_datasets``, and shifted
datasets named ``<dataset>+<corruption>`` (a registered dataset with a registered corruption applied)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hmlib import paths
from hmlib.config import DataConfig
from hmlib.data import corruptions
from hmlib.errors import DatasetError

HUB_IDS: dict[str, str] = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "kmnist": "tanganke/kmnist",
    "hebrew_chars": "sivan22/hebrew-handwritten-characters",
    "math_shapes": "prithivMLmods/Math-Shapes",
}

# A dataset or split name becomes a folder / file name under data_cache/ (and a folder under the mirror).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# A shifted dataset: a dataset name, '+', a corruption name (one corruption: 'mnist+rotate', not 'mnist+rotate+fog').
SHIFTED_PATTERN = re.compile(rf"{NAME_PATTERN.pattern}\+{corruptions.NAME_PATTERN.pattern}")

# Datasets without an offline copy in the project's mirror; the error message says so.
HUB_ONLY = {"kmnist": "no offline copy of KMNIST exists here (see ../shared/data/README.md); it loads from the hub only"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset can come from: a hub id and/or a local folder."""

    name: str
    hub_id: str | None = None
    local_dir: Path | None = None  # a folder of {train,test}.parquet or an image folder (custom datasets)
    base: str | None = None  # a shifted dataset: the dataset it is made from ...
    corruption: str | None = None  # ... and the corruption applied to it (hmlib.data.corruptions)


def repo_relative(value: str | Path) -> Path:
    """A user-given folder as an absolute path; a relative one is taken from the repository root, not the cwd."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else paths.REPO_ROOT / path).resolve()


def _looks_like_path(value: str) -> bool:
    """A local folder (starts with /, . or ~, or exists) rather than a hub id such as 'org/name'."""
    return value.startswith(("/", ".", "~")) or repo_relative(value).exists()


def check_name(name: object, what: str = "dataset name", *, shifted: bool = True) -> str:
    """``name`` if it is safe as a single file name (letters, digits, '_', '-', '.'; no '..'; with ``shifted``,
    optionally one '+<corruption>'), else DatasetError."""
    patterns = (NAME_PATTERN, SHIFTED_PATTERN) if shifted else (NAME_PATTERN,)
    if isinstance(name, str) and any(p.fullmatch(name) for p in patterns) and ".." not in name:
        return name
    base, _, corruption = name.partition("+") if isinstance(name, str) else ("", "", "")
    if shifted and corruption and NAME_PATTERN.fullmatch(base) and ".." not in base and "+" not in corruption:
        raise DatasetError(f"unknown corruption {corruption!r} in {what} {name!r}; corruptions are named in lower "
                           f"case: {', '.join(sorted(corruptions.CORRUPTIONS))}")
    plus = (", optionally followed by one '+<corruption>' (e.g. 'mnist+rotate')" if shifted
            else "; '+' is reserved for '<dataset>+<corruption>'")
    raise DatasetError(f"invalid {what} {name!r}: use up to 100 letters, digits, '_', '-' or '.', starting with a "
                       f"letter or digit and without '..'{plus} (it becomes a folder name; a path is not a name: "
                       "register a local folder under data.custom_datasets as {\"<name>\": \"<folder>\"})")


def parse_shifted(name: str) -> tuple[str, str | None]:
    """``(base dataset, corruption)`` of 'base+corruption', ``(name, None)`` of a plain name; DatasetError for an
    unsafe name or an unregistered corruption (the base is looked up by :func:`get_spec`)."""
    check_name(name)
    if "+" not in name:
        return name, None
    base, corruption = name.split("+")
    try:
        return base, corruptions.get_corruption(corruption).name
    except DatasetError as err:
        raise DatasetError(f"dataset '{name}': {err}") from None


def custom_datasets(cfg: DataConfig) -> dict[str, str]:
    """``cfg.custom_datasets`` as ``{name: hub id or local folder}``, every name checked and every value non-empty."""
    custom = {}
    for name, value in dict(cfg.custom_datasets).items():
        custom[check_name(name, "custom dataset name", shifted=False)] = str(value)
        if not str(value).strip():
            raise DatasetError(f"data.custom_datasets['{name}'] is empty; give a hub id ('org/name') or a local folder")
    return custom


def get_spec(name: str, cfg: DataConfig) -> DatasetSpec:
    """Look a dataset up by name: built-in first, then ``cfg.custom_datasets`` (hub id or local folder); a shifted
    name 'base+corruption' needs both registered."""
    base, corruption = parse_shifted(name)
    if corruption is not None:
        get_spec(base, cfg)
        return DatasetSpec(name=name, base=base, corruption=corruption)
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
    """All registered dataset names (built-in, then custom); any of them + a corruption is a shifted dataset."""
    return list(dict.fromkeys(list(HUB_IDS) + list(custom_datasets(cfg))))
