"""mesagen.runtime: load generated layers, build models, train and evaluate on the paper's tasks.

Never imports the compiler side (spec / symbolic / ir / backends): training needs no sympy.
"""

from mesagen.runtime.config import ConfigError, RunConfig, load_config
from mesagen.runtime.loader import SUPPORTED_CODEGEN_FORMAT, LayerLoadError, load_layer_module, resolve_layer_path
from mesagen.runtime.model import Model
from mesagen.runtime.train import Trainer, train

__all__ = ["ConfigError", "RunConfig", "load_config", "SUPPORTED_CODEGEN_FORMAT", "LayerLoadError",
           "load_layer_module", "resolve_layer_path", "Model", "Trainer", "train"]
