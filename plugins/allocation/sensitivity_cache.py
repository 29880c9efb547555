"""Sensitivity measured once per model, calibration set and settings within a process.

Why: a trade-off batch plans several budgets (2.5 to 4.5 average bits) for one model. The
sensitivity table does not depend on the budget, and measuring it is the slow part of planning
(62 s for SmolLM2-135M on 2 quiet CPU cores, several minutes under load), while choosing
formats from it takes milliseconds. So the allocator keeps the last few tables, keyed by what
they depend on:

* the model's content: a BLAKE2b digest of every parameter and buffer (deferred, meta-device
  weights are fetched for the digest, one at a time, and hashed as the fetcher gives them, which
  is how the measurement sees them), with the model's class and config, so a changed or
  different model never hits a stale table, whatever object holds it;
* the calibration token ids actually used;
* the measurement settings (modules, candidate formats, symmetry, weight kind, weighting,
  samples, batch size, device type, rotation seed).

A reused table is a copy, and the plan's details say it was reused and give the key, so an
auditor sees that two runs share one measurement. Anything that cannot be fingerprinted
(a deferred weight the fetcher cannot give back) is measured afresh, never guessed.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from quantmill.plugins.allocation.cost import Candidate, WeightKind
from quantmill.plugins.allocation.sensitivity import Sensitivity, SensitivityOptions
from quantmill.plugins.models import deferred

#: tables kept (each is small: one float per module and candidate)
CAPACITY = 4

_tables: OrderedDict[str, Sensitivity] = OrderedDict()


def _digest_tensor(digest: hashlib.blake2b, name: str, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():  # the array's own buffer: no extra copy of a large tensor
        digest.update(data.reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(model: torch.nn.Module) -> str | None:
    """Digest of every parameter and buffer of ``model`` (None if a deferred weight cannot be
    fetched). Shared (tied) parameters count once, under their first name."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    described = config.to_json_string() if hasattr(config, "to_json_string") else repr(config)
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}|{described}".encode())
    fetcher = deferred.fetcher_of(model)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if tensor.is_meta:
            if fetcher is None:
                return None
            try:
                fetched = fetcher.fetch([name])[name]
            except (KeyError, OSError, ValueError):
                return None
            _digest_tensor(digest, name, fetched)
        else:
            _digest_tensor(digest, name, tensor)
    return digest.hexdigest()


def measurement_key(model: torch.nn.Module, names: Sequence[str],
                    candidates: Sequence[Candidate], sym: bool, kind: WeightKind,
                    input_ids: torch.Tensor, options: SensitivityOptions) -> str | None:
    """What a sensitivity table depends on, as one digest (None: not fingerprintable)."""
    model_digest = model_fingerprint(model)
    if model_digest is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    settings = (model_digest, tuple(names), tuple((k.bits, k.group_size) for k in candidates),
                sym, kind, options.weighting, options.num_samples, options.batch_size,
                options.fisher_samples, options.device.type, options.rotation_seed)
    digest.update(repr(settings).encode())
    _digest_tensor(digest, "input_ids", input_ids)
    return digest.hexdigest()


def cached_sensitivity(key: str | None, measure: Callable[[], Sensitivity]
                       ) -> tuple[Sensitivity, bool]:
    """(table, reused): the table stored under ``key``, or ``measure()``'s (then stored)."""
    if key is not None and key in _tables:
        _tables.move_to_end(key)
        return copy.deepcopy(_tables[key]), True
    table = measure()
    if key is not None:
        _tables[key] = copy.deepcopy(table)
        while len(_tables) > CAPACITY:
            _tables.popitem(last=False)
    return table, False


def clear() -> None:
    """Forget every stored table (tests; or to force a fresh measurement)."""
    _tables.clear()
