"""The data stage: dataset registry, loading (cache -> mirror -> hub), preprocessing, splits and task sampling."""
from hmlib.data.loading import ImageSet, load_split, preprocess_settings
from hmlib.data.overview import Preview, cache_status, example_task, load_datasets, preview, source_status, summary
from hmlib.data.preprocess import normalise_polarity, preprocess_image, preprocess_images
from hmlib.data.registry import HUB_IDS, DatasetError, DatasetSpec, dataset_names, get_spec
from hmlib.data.splits import stratified_split, stratified_subset
from hmlib.data.tasks import TaskBatch, TaskSampler, fit_task_size, sample_tasks

__all__ = [
    "DatasetError", "DatasetSpec", "HUB_IDS", "ImageSet", "Preview", "TaskBatch", "TaskSampler", "cache_status",
    "dataset_names", "example_task", "get_spec", "load_datasets", "load_split", "normalise_polarity",
    "fit_task_size", "preprocess_image", "preprocess_images", "preprocess_settings", "preview", "sample_tasks",
    "source_status",
    "stratified_split", "stratified_subset", "summary",
]
