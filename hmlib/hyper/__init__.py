"""The hypernetwork stage: set encoders, generators, the inner loop, meta-training and portable checkpoints."""
from hmlib.hyper.adapt import AdaptResult, adapt, predict_clusters, predict_task
from hmlib.hyper.checkpoints import load_hypernet
from hmlib.hyper.generators import GENERATORS, TaskInputs, TaskState
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.inputs import TaskData, load_task_data, task_data_from_models
from hmlib.hyper.losses import INNER_LOSSES, aligned_cross_entropy, inner_loss, task_accuracy
from hmlib.hyper.metatrain import MetaResult, MetaTrainingError, fit_hypernet, meta_train

__all__ = ["AdaptResult", "GENERATORS", "HyperNet", "INNER_LOSSES", "MetaResult", "MetaTrainingError", "TaskData",
           "TaskInputs", "TaskState", "adapt", "aligned_cross_entropy", "fit_hypernet", "inner_loss", "load_hypernet",
           "load_task_data", "meta_train", "predict_clusters", "predict_task", "task_accuracy",
           "task_data_from_models"]
