"""hmlib: meta-trained hypernetworks that cluster unseen unlabeled image datasets and adapt at test time."""
from hmlib.config import Config, ConfigError, configure_runtime, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "configure_runtime", "load_config", "__version__"]
