"""Language models: which exist, where their weights live, and loading them safely.

Importing this package is cheap; torch and transformers are imported only when a model is
converted, built or loaded, so services and the CLI start fast when they need no model.
"""

from sensorium.models.store import (
    DEFAULT_MODEL,
    DEFAULT_SPECS,
    MANIFEST,
    Converter,
    GgufFileSource,
    GgufPackageSource,
    LoadedModel,
    ModelRegistry,
    ModelSpec,
    ModelStore,
    PathSource,
    check_model_dir,
    convert_gguf,
    load_model,
    model_digest,
)
from sensorium.models.tiny import build_tiny_llama

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SPECS",
    "MANIFEST",
    "Converter",
    "GgufFileSource",
    "GgufPackageSource",
    "LoadedModel",
    "ModelRegistry",
    "ModelSpec",
    "ModelStore",
    "PathSource",
    "build_tiny_llama",
    "check_model_dir",
    "convert_gguf",
    "load_model",
    "model_digest",
]
