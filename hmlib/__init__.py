"""hmlib: meta-trained hypernetworks that cluster unseen unlabeled image datasets and adapt at test time."""
from hmlib.config import Config, ConfigError, configure_runtime, load_config

__version__ = "0.2.0"
__all__ = ["Config", "ConfigError", "HyperClusterer", "configure_runtime", "load_config", "__version__"]


def __getattr__(name: str):
    """``hmlib.HyperClusterer`` without importing torch and the models at ``import hmlib``."""
    if name == "HyperClusterer":
        from hmlib.cluster.estimator import HyperClusterer  # noqa: PLC0415 (lazy: keeps `import hmlib` light)

        return HyperClusterer
    raise AttributeError(f"module 'hmlib' has no attribute {name!r}")
