"""The ``size`` evaluator: bytes on disk and effective bits per quantized weight.

* ``disk_bytes``: every file of the checkpoint directory (or of the source model's files).
* ``param_count``: elements of all parameters, counting quantized weights as unpacked elements.
* ``quantized_weights``: elements of the weights held in packed form.
* ``disk_bits_per_param``: bytes on disk x 8 / parameters, comparable between any two models
  (the demo GGUF, Q4_1 with float norms, is about 5.85).
* ``bits_per_weight`` (quantized models only): bits of packed weights, zero points, scales and
  group indices per quantized weight element, i.e. what the quantization costs (4-bit g128 with
  576-wide layers is about 4.21).
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantmill.plugins.base import EvaluationResult, Evaluator, LoadedModel, Metric
from quantmill.plugins.hookspecs import hookimpl


def _disk_bytes(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total


def packed_stats(model: torch.nn.Module) -> tuple[int, int, int]:
    """(quantized weight elements, bits spent on them, other parameter elements).

    A quantized linear module (GPTQ, look-up table, int8...) names the buffers that stand for
    its weight in a ``QUANTIZED_BUFFERS`` class attribute; their bits are what the weight costs.
    """
    quantized, bits = 0, 0
    for module in model.modules():
        buffers = getattr(type(module), "QUANTIZED_BUFFERS", None)
        if buffers:
            quantized += int(module.in_features) * int(module.out_features)
            bits += sum(getattr(module, name).numel() * getattr(module, name).element_size() * 8
                        for name in buffers if getattr(module, name, None) is not None)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return quantized, bits, params


class SizeEvaluator(Evaluator):
    name = "size"

    def evaluate(self, loaded: LoadedModel, checkpoint_dir: Path | None) -> EvaluationResult:
        paths = [checkpoint_dir] if checkpoint_dir is not None else list(loaded.files)
        disk = _disk_bytes(paths)
        quantized, bits, params = packed_stats(loaded.model)
        total = params + quantized
        metrics = [
            Metric("disk_bytes", float(disk), "B"),
            Metric("disk_mb", disk / 1e6, "MB"),
            Metric("param_count", float(total)),
            Metric("quantized_weights", float(quantized)),
            Metric("disk_bits_per_param", disk * 8 / total if total else 0.0, "bit"),
        ]
        if quantized:
            metrics.append(Metric("bits_per_weight", bits / quantized, "bit"))
        protocol = {"counted": "checkpoint directory" if checkpoint_dir else "source files"}
        return EvaluationResult(self.name, metrics, protocol)


@hookimpl
def register_evaluators() -> list[type[Evaluator]]:
    return [SizeEvaluator]
