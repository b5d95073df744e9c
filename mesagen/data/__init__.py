"""The paper's tasks: linear dynamics (and variants) and in-context linear regression."""

from mesagen.data.dynamics import (DynamicsConfig, TaskKind, constructed_tokens, raw_tokens,
                                   sample_states, sample_system)
from mesagen.data.regression import RegressionConfig, interleave, sample_regression

__all__ = ["DynamicsConfig", "TaskKind", "constructed_tokens", "raw_tokens", "sample_states", "sample_system",
           "RegressionConfig", "interleave", "sample_regression"]
