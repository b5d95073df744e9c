"""The paper's tasks: linear dynamics (and variants), in-context linear regression, byte-level text."""

from mesagen.data.dynamics import (DynamicsConfig, TaskKind, constructed_tokens, raw_tokens,
                                   sample_states, sample_system)
from mesagen.data.regression import RegressionConfig, interleave, sample_regression
from mesagen.data.text import (VOCAB_SIZE, ByteCorpus, CorpusError, TextConfig, TextData, bits_per_byte,
                               icl_score, load_corpus, stdlib_corpus)

__all__ = ["DynamicsConfig", "TaskKind", "constructed_tokens", "raw_tokens", "sample_states", "sample_system",
           "RegressionConfig", "interleave", "sample_regression", "VOCAB_SIZE", "ByteCorpus", "CorpusError", "TextConfig",
           "TextData", "bits_per_byte", "icl_score", "load_corpus", "stdlib_corpus"]
