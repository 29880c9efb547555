"""Layer-by-layer GPTQ over a decoder model: one block at a time, each block's linears in
execution order, so later linears see the already-quantized earlier ones.

For each decoder block the calibration activations go through the block once, in stages:

1. ``input_layernorm(h)`` feeds q/k/v: accumulate their Hessian, quantize q, k, v;
2. self-attention with quantized q/k/v up to ``o_proj``'s input (o_proj itself is skipped):
   cache that input, accumulate o's Hessian, quantize o;
3. ``h2 = h + o(x)``, ``post_attention_layernorm(h2)`` feeds gate/up: quantize gate, up;
4. the MLP up to ``down_proj``'s input (down itself skipped): cache it, quantize down;
5. ``h2 + down(x)`` is the next block's input, computed with the quantized weights.

So every matrix product of the block runs once per calibration token, exactly the work a single
forward pass does, plus the Hessians: no second "recompute the outputs" pass. This staging is
checked numerically against the block's own forward on the first batch; an architecture whose
blocks are not structured this way is refused with a clear error rather than quantized wrongly.
The model passed in is never modified: each block is quantized in a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from quantmill.plugins.base import ModuleQuantSpec, QuantizedWeight
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.models import deferred
from quantmill.plugins.progress import progress_bar
from quantmill.plugins.quantizers.gptq.algorithm import (
    GPTQSettings,
    GPTQStats,
    HessianAccumulator,
    gptq_quantize,
    hessian_error,
    prepare_hessian,
    split_rows,
)

ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ATTENTION_OUTPUT = "self_attn.o_proj"
MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")
MLP_OUTPUT = "mlp.down_proj"
BLOCK_LINEARS = (*ATTENTION_INPUTS, ATTENTION_OUTPUT, *MLP_INPUTS, MLP_OUTPUT)


class _StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


@dataclass
class LayerwiseOptions:
    """Settings shared by every module; bits/group/sym come per module from the plan."""

    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    mse_clip: bool = False
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList holding the decoder blocks (``model.layers`` in Llama-family models)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and (
            count is None or len(module) == count
        ):
            return name, module
    raise QuantmillError("gptq: could not find the model's decoder layers")


def _check_block_structure(block: torch.nn.Module, name: str) -> None:
    modules = dict(block.named_modules())
    missing = [m for m in (*BLOCK_LINEARS, "input_layernorm", "post_attention_layernorm")
               if m not in modules]
    if missing:
        raise QuantmillError(
            f"gptq: block {name} ({type(block).__name__}) is not a Llama-style decoder block "
            f"(missing {', '.join(missing)}); layer-by-layer GPTQ supports Llama, Mistral, "
            "Qwen2 and SmolLM-style architectures"
        )


@torch.inference_mode()
def capture_block_inputs(
    model: torch.nn.Module, first_block: torch.nn.Module, input_ids: torch.Tensor,
    batch_size: int, device: torch.device,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to its first decoder block; return its inputs and keyword arguments per
    batch (rotary position embeddings, masks), without running any block."""
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs["hidden_states"]
        hidden.append(hs.detach().to(torch.float32))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_list


def _run_until(module: torch.nn.Module, stop_at: torch.nn.Module, call: Callable[[], Any],
               on_input: Callable[[torch.Tensor], None]) -> None:
    """Call ``call()`` (a forward through ``module``), hand ``stop_at``'s input to ``on_input``
    and skip everything from ``stop_at`` on."""

    def hook(_module: torch.nn.Module, args: tuple) -> None:
        on_input(args[0])
        raise _StopForward

    handle = stop_at.register_forward_pre_hook(hook)
    try:
        call()
    except _StopForward:
        pass
    finally:
        handle.remove()


@dataclass
class BlockResult:
    weights: dict[str, QuantizedWeight]
    stats: dict[str, GPTQStats]


def linear_weight_before(stacked: torch.Tensor, group: list[str], name: str,
                         modules: dict[str, torch.nn.Module]) -> torch.Tensor:
    """``name``'s rows of the stacked float weights (before quantization)."""
    start = 0
    for other in group:
        rows = modules[other].out_features
        if other == name:
            return stacked[start : start + rows]
        start += rows
    raise KeyError(name)


class BlockQuantizer:
    """Quantizes one decoder block in stages and turns its inputs into the next block's."""

    def __init__(self, block: torch.nn.Module, specs: dict[str, ModuleQuantSpec],
                 options: LayerwiseOptions, name: str = "",
                 fetcher: deferred.WeightFetcher | None = None):
        self.work = _working_copy(block, options.device, name, fetcher)
        self.modules = dict(self.work.named_modules())
        self.specs = specs
        self.options = options
        self.result = BlockResult({}, {})

    def _quantize(self, names: tuple[str, ...], acc: HessianAccumulator) -> None:
        """GPTQ the planned modules among ``names`` (which all read the same input).

        Rows of W are independent given H, so modules with the same spec are stacked into one
        matrix and quantized in one pass: the per-column loop runs once for q/k/v, not three
        times, with the same result as quantizing each alone.
        """
        todo = [n for n in names if n in self.specs]
        if not todo:
            return
        o = self.options
        hessian = prepare_hessian(acc.hessian(), o.damp_percent, o.desc_act)
        by_spec: dict[ModuleQuantSpec, list[str]] = {}
        for name in todo:
            spec = self.specs[name]
            by_spec.setdefault(ModuleQuantSpec(spec.bits, spec.group_size, spec.sym, ""),
                               []).append(name)
        for spec, group in by_spec.items():
            settings = GPTQSettings(bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                                    desc_act=o.desc_act, static_groups=o.static_groups,
                                    damp_percent=o.damp_percent, block_size=o.block_size,
                                    mse_clip=o.mse_clip)
            stacked = torch.cat([self.modules[n].weight for n in group])  # [sum(out), in]
            qw, stats = gptq_quantize(stacked, hessian, settings, measure_error=False)
            stacked[:, hessian.dead] = 0.0  # as GPTQ treats them, for the per-module error
            for name, part in zip(group, split_rows(qw, [self.modules[n].out_features
                                                         for n in group]), strict=True):
                linear = self.modules[name]
                if linear.bias is not None:
                    part.bias = linear.bias.detach().cpu().clone()
                # later stages run with the quantized weights, exactly as the checkpoint will
                linear.weight.data = part.dequantize().to(linear.weight.device,
                                                          linear.weight.dtype)
                self.result.weights[name] = part
                self.result.stats[name] = GPTQStats(
                    damp_used=stats.damp_used, dead_inputs=stats.dead_inputs,
                    hessian_error=hessian_error(linear_weight_before(stacked, group, name,
                                                                     self.modules),
                                                part, hessian.hessian))

    @torch.inference_mode()
    def run(self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> BlockResult:
        """Quantize the block; ``hidden`` is replaced, batch by batch, by the block's outputs."""
        m = self.modules
        dev = self.options.device
        ln1, ln2 = m["input_layernorm"], m["post_attention_layernorm"]
        attn, mlp = m["self_attn"], m["mlp"]
        in_features = m[ATTENTION_INPUTS[0]].in_features

        acc = HessianAccumulator(in_features, dev)
        for h in hidden:
            acc.add(ln1(h.to(dev)))
        self._quantize(ATTENTION_INPUTS, acc)

        acc = HessianAccumulator(m[ATTENTION_OUTPUT].in_features, dev)
        attn_inputs: list[torch.Tensor] = []
        for h, kw in zip(hidden, kwargs, strict=True):
            def keep(x: torch.Tensor) -> None:
                acc.add(x)
                attn_inputs.append(x.detach())
            _run_until(attn, m[ATTENTION_OUTPUT],
                       lambda h=h, kw=kw: attn(hidden_states=ln1(h.to(dev)), **kw), keep)
        self._quantize((ATTENTION_OUTPUT,), acc)

        acc = HessianAccumulator(m[MLP_INPUTS[0]].in_features, dev)
        for i, x in enumerate(attn_inputs):
            hidden[i] = hidden[i].to(dev) + m[ATTENTION_OUTPUT](x)  # h2 = h + attention
            acc.add(ln2(hidden[i]))
        attn_inputs.clear()  # free the cached o_proj inputs
        self._quantize(MLP_INPUTS, acc)

        acc = HessianAccumulator(m[MLP_OUTPUT].in_features, dev)
        mlp_inputs: list[torch.Tensor] = []
        for h2 in hidden:
            def keep_mlp(x: torch.Tensor) -> None:
                acc.add(x)
                mlp_inputs.append(x.detach())
            _run_until(mlp, m[MLP_OUTPUT], lambda h2=h2: mlp(ln2(h2)), keep_mlp)
        self._quantize((MLP_OUTPUT,), acc)

        for i, x in enumerate(mlp_inputs):
            hidden[i] = (hidden[i] + m[MLP_OUTPUT](x)).to(torch.float32)
            mlp_inputs[i] = None  # type: ignore[call-overload]  # free as we go
        return self.result


def _working_copy(block: torch.nn.Module, device: torch.device, name: str,
                  fetcher: deferred.WeightFetcher | None) -> torch.nn.Module:
    """A copy of the block on ``device`` with real weights (deferred ones fetched now); the
    caller's block stays as it is."""
    work = copy.deepcopy(block)
    if fetcher is not None:
        deferred.materialize(work, name, fetcher, device)
    return work.to(device)


@torch.inference_mode()
def verify_staging(block: torch.nn.Module, h: torch.Tensor, kw: dict[str, Any],
                   device: torch.device, name: str = "",
                   fetcher: deferred.WeightFetcher | None = None) -> None:
    """Refuse a block whose forward is not what the staged execution assumes (checked on the
    first block and the first calibration sample; every block of a model shares one class)."""
    work = _working_copy(block, device, name, fetcher)
    m = dict(work.named_modules())
    x = h[:1].to(device)
    batch = h.shape[0]

    def first_sample(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[:1]
        if isinstance(value, tuple):
            return tuple(first_sample(v) for v in value)
        return value

    small_kw = {k: first_sample(v) for k, v in kw.items()}
    reference = work(x, **small_kw)
    reference = reference[0] if isinstance(reference, tuple) else reference
    h2 = x + m["self_attn"](hidden_states=m["input_layernorm"](x), **small_kw)[0]
    staged = h2 + m["mlp"](m["post_attention_layernorm"](h2))
    if not torch.allclose(reference, staged, rtol=1e-4, atol=1e-4 * float(reference.abs().max())):
        raise QuantmillError(
            f"gptq: {type(block).__name__} does not compute h + attn(ln1(h)) then "
            "h2 + mlp(ln2(h2)); this architecture needs its own staging"
        )


def quantize_model_layerwise(
    model: torch.nn.Module, plan: dict[str, ModuleQuantSpec], input_ids: torch.Tensor,
    options: LayerwiseOptions,
) -> tuple[dict[str, QuantizedWeight], dict[str, GPTQStats]]:
    """GPTQ every planned linear of every decoder block, block by block."""
    prefix, layers = find_decoder_layers(model)
    per_block: list[dict[str, ModuleQuantSpec]] = [{} for _ in layers]
    for name, spec in plan.items():
        head, _, rest = name.partition(f"{prefix}.")
        index, _, local = rest.partition(".")
        if head or not index.isdigit() or local not in BLOCK_LINEARS:
            raise QuantmillError(
                f"gptq quantizes the linears of decoder blocks; '{name}' is not one "
                "(skip it, or quantize it with rtn)"
            )
        per_block[int(index)][local] = spec
    for i, block in enumerate(layers):
        _check_block_structure(block, f"{prefix}.{i}")

    hidden, kwargs = capture_block_inputs(model, layers[0], input_ids, options.batch_size,
                                          options.device)
    kwargs = [{k: v for k, v in kw.items() if k not in ("use_cache", "past_key_values",
                                                         "past_key_value")} for kw in kwargs]
    fetcher = deferred.fetcher_of(model)
    verify_staging(layers[0], hidden[0], kwargs[0], options.device, f"{prefix}.0", fetcher)
    weights: dict[str, QuantizedWeight] = {}
    stats: dict[str, GPTQStats] = {}
    with progress_bar("quantize (gptq)", total=len(layers)) as advance:
        for i, block in enumerate(layers):
            result = BlockQuantizer(block, per_block[i], options, f"{prefix}.{i}",
                                    fetcher).run(hidden, kwargs)
            for local, qw in result.weights.items():
                weights[f"{prefix}.{i}.{local}"] = qw
                stats[f"{prefix}.{i}.{local}"] = result.stats[local]
            advance(1)
    return weights, stats
