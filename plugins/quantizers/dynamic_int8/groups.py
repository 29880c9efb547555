"""Where a model can be smoothed, and the activation maxima smoothing needs (model wiring).

A smoothing group is one activation: the module that produces it (a norm, or a linear whose
output rows can be scaled) and the linears that read it. In a Llama-style decoder block:

* ``input_layernorm`` -> ``q_proj``, ``k_proj``, ``v_proj``;
* ``post_attention_layernorm`` -> ``gate_proj``, ``up_proj``;
* ``up_proj`` (rows) -> ``down_proj``: down's input is ``act(gate) * up``, linear in up's output;
* and after the last block the final norm -> ``lm_head``.

``o_proj`` is left alone: its input is attention over ``v`` with grouped query heads, so a factor
folded into ``v_proj``'s rows would have to be shared by every query head of a key/value group
and pass through the softmax-weighted sum; SmoothQuant leaves it unsmoothed as well.

Groups are found by the attribute names Llama, Mistral, Qwen2 and SmolLM share, then *checked*
rather than trusted: a norm must scale its output linearly with its weight (Gemma's ``1 + w``
does not), and on the first calibration batch every consumer must be seen reading exactly the
producer's output (``act(gate) * up`` for ``down_proj``). A group that fails is not smoothed,
and the reason is reported, so an unfamiliar architecture costs quality, never correctness.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from quantmill.plugins.progress import progress_bar


@dataclass(frozen=True)
class SmoothGroup:
    """One activation that can be smoothed: ``producer`` makes it, ``consumers`` read it."""

    name: str  # the block or place, for reports ("model.layers.3.self_attn", "lm_head")
    producer: str  # module name
    producer_kind: str  # "norm" (weight, bias divided by s) or "linear" (output rows divided)
    consumers: tuple[str, ...]  # linear module names (columns multiplied by s)


def _linear(module: torch.nn.Module | None, *attrs: str) -> list[torch.nn.Module] | None:
    found = [getattr(module, a, None) for a in attrs]
    return found if all(isinstance(m, torch.nn.Linear) for m in found) else None


def norm_scales_linearly(norm: torch.nn.Module) -> bool:
    """Whether ``norm(x)`` doubles when its weight (and bias) double: true of LayerNorm and
    Llama's RMSNorm, false of a ``(1 + weight)`` norm, whose weight cannot absorb a factor."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta:
        return False
    params = {"weight": weight.detach() * 2}
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        params["bias"] = bias.detach() * 2
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0))
    x = x.to(weight.device, weight.dtype)
    with torch.no_grad():
        y = norm(x)
        doubled = torch.func.functional_call(norm, params, (x,))
    return bool(torch.allclose(doubled, 2 * y, rtol=1e-4, atol=1e-6))


def find_groups(model: torch.nn.Module) -> tuple[list[SmoothGroup], dict[str, str]]:
    """The model's candidate smoothing groups in model order, and {place: why not} for
    places that look smoothable but are not (a norm that cannot absorb a factor)."""
    names = {id(m): n for n, m in model.named_modules()}
    groups: list[SmoothGroup] = []
    refused: dict[str, str] = {}

    def norm_group(place: str, norm: torch.nn.Module | None,
                   consumers: list[torch.nn.Module] | None) -> None:
        if norm is None or consumers is None or id(norm) not in names:
            return
        if not norm_scales_linearly(norm):
            refused[place] = f"{type(norm).__name__} does not scale linearly with its weight"
            return
        groups.append(SmoothGroup(place, names[id(norm)], "norm",
                                  tuple(names[id(c)] for c in consumers)))

    for name, block in model.named_modules():
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is not None:
            norm_group(f"{name}.self_attn", getattr(block, "input_layernorm", None),
                       _linear(attn, "q_proj", "k_proj", "v_proj"))
        if mlp is not None:
            norm_group(f"{name}.mlp", getattr(block, "post_attention_layernorm", None),
                       _linear(mlp, "gate_proj", "up_proj"))
            pair = _linear(mlp, "up_proj", "down_proj")
            if pair is not None and callable(getattr(mlp, "act_fn", None)):
                groups.append(SmoothGroup(f"{name}.mlp.down_proj", names[id(pair[0])],
                                          "linear", (names[id(pair[1])],)))
    get_decoder, get_output = (getattr(model, "get_decoder", None),
                               getattr(model, "get_output_embeddings", None))
    if callable(get_decoder) and callable(get_output):
        head = get_output()
        norm_group("lm_head", getattr(get_decoder(), "norm", None),
                   [head] if isinstance(head, torch.nn.Linear) else None)
    return groups, refused


class _Recorder:
    """Forward hooks that keep each group's running per-channel |activation| maximum and, while
    ``checking`` (the first batch), check that every consumer reads what the producer made."""

    def __init__(self, model: torch.nn.Module, groups: list[SmoothGroup],
                 rows_per_batch: int = 0) -> None:
        self.modules = dict(model.named_modules())
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.rows_per_batch = rows_per_batch
        # one generator per group, all seeded alike: a group's sample (the same positions in
        # every group) does not depend on which other groups are recorded
        self._generators: dict[str, torch.Generator] = {}
        self.bad: dict[str, str] = {}
        self.checking = True
        self._produced: dict[str, torch.Tensor] = {}  # only during the checking batch
        self._gate: dict[str, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for g in groups:
            producer = self.modules[g.producer]
            self.handles.append(producer.register_forward_hook(self._output_hook(g)))
            for c in g.consumers:
                self.handles.append(
                    self.modules[c].register_forward_pre_hook(self._input_hook(g, c)))
            if g.producer_kind == "linear":
                gate = self.modules.get(g.producer.rpartition(".")[0] + ".gate_proj")
                if gate is not None:
                    self.handles.append(gate.register_forward_hook(self._gate_hook(g)))

    def _output_hook(self, g: SmoothGroup):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.checking:
                self._produced[g.name] = output.detach()
            if g.producer_kind == "norm":  # the consumers' input is this very tensor
                self._update(g.name, output)
        return hook

    def _gate_hook(self, g: SmoothGroup):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.checking:
                self._gate[g.name] = output.detach()
        return hook

    def _input_hook(self, g: SmoothGroup, consumer: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if self.checking:
                self._check(g, consumer, x)
            if g.producer_kind == "linear" and consumer == g.consumers[0]:
                self._update(g.name, x)
        return hook

    def _check(self, g: SmoothGroup, consumer: str, x: torch.Tensor) -> None:
        """Compare what ``consumer`` reads with what the producer made; forget the producer's
        output after its last consumer (holding every block's would cost gigabytes)."""
        out = self._produced.get(g.name)
        if out is None:
            self.bad.setdefault(g.name, f"'{g.producer}' did not run before '{consumer}'")
            return
        if g.producer_kind == "linear":  # down_proj reads act(gate) * up
            gate = self._gate.get(g.name)
            mlp = self.modules[g.producer.rpartition(".")[0]]
            if gate is None:
                self.bad.setdefault(g.name, "the gate projection was not seen")
                return
            out = mlp.act_fn(gate) * out
        # an output layer may see only the last positions (logits_to_keep)
        ref = out[..., -x.shape[-2]:, :] if x.dim() >= 2 and out.dim() >= 2 else out
        if ref.shape != x.shape or not torch.allclose(ref, x, rtol=1e-5, atol=1e-6):
            self.bad.setdefault(g.name, f"'{consumer}' does not read the output of "
                                        f"'{g.producer}'")
        if consumer == g.consumers[-1]:
            self._produced.pop(g.name, None)
            self._gate.pop(g.name, None)

    def _update(self, name: str, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        amax = rows.abs().amax(dim=0).to(torch.float32)
        old = self.absmax.get(name)
        self.absmax[name] = amax if old is None else torch.maximum(old, amax)
        if self.rows_per_batch:
            generator = self._generators.setdefault(name, torch.Generator().manual_seed(0))
            pick = torch.randperm(rows.shape[0], generator=generator)[:self.rows_per_batch]
            self.samples.setdefault(name, []).append(
                rows[pick.to(rows.device)].to("cpu", torch.float32))

    def end_check(self, groups: list[SmoothGroup]) -> None:
        """After the first batch: a group whose consumers never ran is not smoothable either."""
        for g in groups:
            if g.name in self._produced:
                self.bad.setdefault(g.name, f"'{g.consumers[-1]}' did not run")
        self.checking = False
        self._produced.clear()
        self._gate.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@dataclass
class ActivationStats:
    """What the calibration pass saw of each group's activation."""

    absmax: dict[str, torch.Tensor]  # group -> float32 [in], max |x| per channel (CPU)
    samples: dict[str, torch.Tensor]  # group -> float32 [tokens, in], random tokens (CPU)
    bad: dict[str, str]  # group -> why its wiring is not what the names suggest (no stats)


def activation_stats(
    model: torch.nn.Module,
    groups: list[SmoothGroup],
    input_ids: torch.Tensor,
    batch_size: int,
    sample_tokens: int = 0,
) -> ActivationStats:
    """Per-channel max |activation| of every group over the calibration ids [samples,
    seq_len], run batch by batch through the float model, plus about ``sample_tokens`` random
    tokens of each (spread over the batches). Groups whose wiring the first batch contradicted
    are in ``bad`` and have no statistics."""
    if not groups:
        return ActivationStats({}, {}, {})
    device = next(model.parameters()).device
    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the vocabulary-wide logits of every position: not needed
    batches = list(torch.split(input_ids, batch_size))
    recorder = _Recorder(model, groups, -(-sample_tokens // len(batches)) if sample_tokens else 0)
    try:
        with torch.no_grad(), progress_bar("calibrate (smoothing)", total=len(batches)) as advance:
            for index, batch in enumerate(batches):
                model(input_ids=batch.to(device), **kwargs)
                if index == 0:
                    recorder.end_check(groups)
                advance(1)
    finally:
        recorder.close()
    bad = dict(recorder.bad)
    for g in groups:
        if g.name not in recorder.absmax:
            bad.setdefault(g.name, "its activation was never seen")
    return ActivationStats(
        absmax={k: v.cpu() for k, v in recorder.absmax.items() if k not in bad},
        samples={k: torch.cat(v)[:sample_tokens] for k, v in recorder.samples.items()
                 if k not in bad},
        bad=bad)


def activation_absmax(
    model: torch.nn.Module,
    groups: list[SmoothGroup],
    input_ids: torch.Tensor,
    batch_size: int,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``activation_stats`` without samples: (group -> per-channel maxima, group -> why not)."""
    stats = activation_stats(model, groups, input_ids, batch_size)
    return stats.absmax, stats.bad
