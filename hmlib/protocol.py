"""Definitions the stages share about the protocol: which images are held back for model selection."""
from __future__ import annotations

import numpy as np

from hmlib.config import Config
from hmlib.data import stratified_split

VALIDATION_SPLIT_SEED = 0  # fixed: the backbone and meta-training hold back the same validation images


def train_val_indices(labels: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of a meta-training dataset's train split: a stratified ``meta.val_fraction``
    is held back from every training stage (backbone and meta-training) and used only to choose settings."""
    return stratified_split(np.asarray(labels), cfg.meta.val_fraction, VALIDATION_SPLIT_SEED)
