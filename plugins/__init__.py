"""quantmill's plugin API: contracts (``base``), hooks (``hookspecs``) and the built-in plugins.

Plugin authors import ``hookimpl`` and the contracts from here.
"""

from quantmill.plugins.base import (
    BitAllocator,
    CalibrationSet,
    CalibrationSource,
    EvaluationResult,
    Evaluator,
    Exporter,
    LoadedModel,
    Metric,
    ModelSource,
    ModuleQuantSpec,
    PluginConfig,
    QuantizationResult,
    QuantizedWeight,
    Quantizer,
    QuantPlan,
    StorageBackend,
    StoredObject,
)
from quantmill.plugins.errors import ConfigError, PluginError, QuantmillError
from quantmill.plugins.hookspecs import hookimpl

__all__ = [
    "BitAllocator",
    "CalibrationSet",
    "CalibrationSource",
    "ConfigError",
    "EvaluationResult",
    "Evaluator",
    "Exporter",
    "LoadedModel",
    "Metric",
    "ModelSource",
    "ModuleQuantSpec",
    "PluginConfig",
    "PluginError",
    "QuantizationResult",
    "QuantizedWeight",
    "Quantizer",
    "QuantPlan",
    "QuantmillError",
    "StorageBackend",
    "StoredObject",
    "hookimpl",
]
