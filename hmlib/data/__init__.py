"""The data stage: dataset registry, loading (cache -> mirror -> hub), preprocessing, corruptions (shifted datasets
'<dataset>+<corruption>'), splits and task sampling."""
from hmlib.data.corruptions import CORRUPTIONS, Corruption, benchmark_corruptions, corruption_table, train_corruptions
from hmlib.data.loading import ImageSet, load_split, preprocess_settings
from hmlib.data.overview import Preview, cache_status, example_task, load_datasets, preview, source_status, summary
from hmlib.data.preprocess import normalise_polarity, preprocess_image, preprocess_images
from hmlib.data.registry import HUB_IDS, DatasetError, DatasetSpec, dataset_names, get_spec, parse_shifted
from hmlib.data.splits import stratified_split, stratified_subset
from hmlib.data.tasks import TaskBatch, TaskSampler, fit_task_size, sample_tasks

__all__ = [
    "CORRUPTIONS", "Corruption", "DatasetError", "DatasetSpec", "HUB_IDS", "ImageSet", "Preview", "TaskBatch",
    "TaskSampler", "benchmark_corruptions", "cache_status", "corruption_table", "dataset_names", "example_task",
    "fit_task_size", "get_spec", "load_datasets", "load_split", "normalise_polarity", "parse_shifted",
    "preprocess_image", "preprocess_images", "preprocess_settings", "preview", "sample_tasks", "source_status",
    "stratified_split", "stratified_subset", "summary", "train_corruptions",
]
