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
forward pass does, plus the Hessians: no second "recompute the outputs" pass (block tuning,
when enabled, adds its own work: a float forward for the targets, its training steps and a
forward with the tuned weights). This staging is checked numerically against the block's own
forward on the first batch; an architecture whose blocks are not structured this way is refused
with a clear error rather than quantized wrongly.
The model passed in is never modified: each block is quantized in a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from quantmill.plugins.base import ModuleQuantSpec, QuantizedWeight
from quantmill.plugins.errors import QuantmillError
from quantmill.plugins.hadamard import InputRotation, rotation_site
from quantmill.plugins.models import deferred
from quantmill.plugins.models.memory import release_free_memory
from quantmill.plugins.models.modules import block_output
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
from quantmill.plugins.quantizers.gptq.block_tuning import TuningSettings, TuningStats, tune_block

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
    refit_scales: bool = False
    batch_size: int = 8
    #: dtype of the cached o_proj/down_proj inputs (see ``Workspace``); Hessians always see the
    #: float32 activations
    activation_cache: torch.dtype = torch.bfloat16
    #: block-wise reconstruction tuning after each block's GPTQ (off unless ``epochs > 0``)
    tuning: TuningSettings = field(default_factory=TuningSettings)
    #: randomized Hadamard input rotations (``plugins/hadamard.py``) under this seed; None: off
    rotation_seed: int | None = None
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
    batch_size: int, device: torch.device, into: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to its first decoder block; return its inputs and keyword arguments per
    batch (rotary position embeddings, masks), without running any block.

    With ``into`` (float32 [num_samples, seq_len, hidden]) the inputs are written there and the
    returned tensors are views of it, one per batch.
    """
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs["hidden_states"]
        if into is None:
            hidden.append(hs.detach().to(torch.float32))
        else:
            start = sum(h.shape[0] for h in hidden)
            view = into[start : start + hs.shape[0]]
            view.copy_(hs)
            hidden.append(view)
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    embeddings = model.get_input_embeddings()
    prefix = next(name for name, m in model.named_modules() if m is embeddings)
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        # a deferred input embedding is fetched for this pass only
        with deferred.borrowed(embeddings, prefix, deferred.fetcher_of(model), device):
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
class Workspace:
    """Activation buffers allocated once for the whole model and reused by every block.

    Why: a block's activations (its inputs, o_proj's inputs, down_proj's inputs) allocated afresh
    for each block leave the C allocator with freed chunks it keeps (RSS grew by ~500 MB over
    SmolLM2-135M's 30 blocks); fixed buffers make every block's allocations the same. o_proj's
    inputs are consumed (stage 3) before down_proj's are produced (stage 4), so both live in one
    buffer. Batches are views.

    That buffer may hold bfloat16 (the default): the cached inputs only serve to compute o_proj's
    and down_proj's outputs with their quantized weights, after the Hessians were accumulated
    from the float32 activations. Rounding them costs a relative error of 2^-9 in those outputs,
    well below what 8-bit, let alone 2-4-bit, weights do to them; it halves the largest buffer
    (SmolLM2-135M, 64 x 512 tokens: 100 MB instead of 201 MB). ``float32`` keeps the pass exact.
    """

    hidden: torch.Tensor  # [samples, seq, hidden]: block inputs, updated in place to outputs
    scratch: torch.Tensor  # [samples * seq * max(o_proj.in, down_proj.in)], cache dtype

    @classmethod
    def allocate(cls, input_ids: torch.Tensor, block: torch.nn.Module, device: torch.device,
                 cache_dtype: torch.dtype = torch.float32) -> Workspace:
        m = dict(block.named_modules())
        samples, seq = input_ids.shape
        width = max(m[ATTENTION_OUTPUT].in_features, m[MLP_OUTPUT].in_features)
        return cls(torch.empty(samples, seq, m[ATTENTION_INPUTS[0]].in_features,
                               dtype=torch.float32, device=device),
                   torch.empty(samples * seq * width, dtype=cache_dtype, device=device))

    def scratch_batches(self, sizes: list[int], width: int) -> list[torch.Tensor]:
        """The scratch buffer as [batch, seq, width] views, one per batch of ``sizes``."""
        seq = self.hidden.shape[1]
        view = self.scratch[: sum(sizes) * seq * width].view(sum(sizes), seq, width)
        return list(torch.split(view, sizes))


@dataclass
class BlockResult:
    weights: dict[str, QuantizedWeight]
    stats: dict[str, GPTQStats]
    #: tuned float parameters of the block (local name -> tensor), from block tuning
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    tuning: TuningStats | None = None


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
        self.name = name
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
        rotation = None
        raw = acc.hessian()
        if o.rotation_seed is not None:
            # one rotation per input site: GPTQ works on W @ T with the Hessian of x @ T
            site = rotation_site(f"{self.name}.{names[0]}" if self.name else names[0])
            rotation = InputRotation.for_site(raw.shape[0], o.rotation_seed, site)
            raw = rotation.rotate_hessian(raw)
        hessian = prepare_hessian(raw, o.damp_percent, o.desc_act)
        by_spec: dict[ModuleQuantSpec, list[str]] = {}
        for name in todo:
            spec = self.specs[name]
            by_spec.setdefault(ModuleQuantSpec(spec.bits, spec.group_size, spec.sym, ""),
                               []).append(name)
        for spec, group in by_spec.items():
            settings = GPTQSettings(bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                                    desc_act=o.desc_act, static_groups=o.static_groups,
                                    damp_percent=o.damp_percent, block_size=o.block_size,
                                    mse_clip=o.mse_clip, refit_scales=o.refit_scales)
            stacked = torch.cat([self.modules[n].weight for n in group])  # [sum(out), in]
            if rotation is not None:
                stacked = rotation.apply(stacked.float())
            qw, stats = gptq_quantize(stacked, hessian, settings, measure_error=False)
            stacked[:, hessian.dead] = 0.0  # as GPTQ treats them, for the per-module error
            for name, part in zip(group, split_rows(qw, [self.modules[n].out_features
                                                         for n in group]), strict=True):
                linear = self.modules[name]
                if linear.bias is not None:
                    part.bias = linear.bias.detach().cpu().clone()
                part.input_rotation = rotation
                # the error in GPTQ's (rotated) basis: the same number as in the original one
                error = hessian_error(linear_weight_before(stacked, group, name, self.modules),
                                      part, hessian.hessian, dequantized=part.dequantize_stored())
                # later stages run with the quantized weights, exactly as the checkpoint will
                dequantized = part.dequantize()
                linear.weight.data = dequantized.to(linear.weight.device, linear.weight.dtype)
                self.result.weights[name] = part
                self.result.stats[name] = GPTQStats(
                    damp_used=stats.damp_used, dead_inputs=stats.dead_inputs,
                    hessian_error=error)

    @torch.inference_mode()
    def forward_in_place(self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
                         inputs: list[torch.Tensor] | None = None) -> None:
        """``hidden[i] = block(inputs[i])`` (``inputs`` defaults to ``hidden``) with the block's
        current weights: the float targets before quantization, the tuned outputs after."""
        for k, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
            x = h if inputs is None else inputs[k]
            h.copy_(block_output(self.work(x, **kw)))

    def tune(self, inputs: list[torch.Tensor], targets: list[torch.Tensor],
             kwargs: list[dict[str, Any]], hidden: list[torch.Tensor]) -> None:
        """Block tuning (``block_tuning.tune_block``) of the quantized block on ``inputs``
        (its quantized-stream inputs) towards ``targets`` (the float block's outputs on the
        float stream). When the tuned block is kept, it replaces GPTQ's weights (and norms) and
        ``hidden`` becomes its outputs; otherwise ``hidden`` keeps GPTQ's."""
        if not self.result.weights:
            return
        tuned = tune_block(self.work, self.result.weights, inputs, targets, kwargs,
                           self.options.tuning)
        self.result.tuning = tuned.stats
        if not tuned.stats.kept:
            return
        self.result.weights.update(tuned.weights)
        self.result.float_overrides.update(tuned.norms)
        params = dict(self.work.named_parameters())
        with torch.inference_mode():
            for name, dense in tuned.dense.items():
                linear = self.modules[name]
                linear.weight.data = dense.to(linear.weight.device, linear.weight.dtype)
            for name, value in tuned.norms.items():
                params[name].data = value.to(params[name].device, params[name].dtype)
        self.forward_in_place(hidden, kwargs, inputs)

    @torch.inference_mode()
    def run(self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
            workspace: Workspace) -> BlockResult:
        """Quantize the block; ``hidden`` (views of ``workspace.hidden``, one per batch) is
        overwritten in place with the block's outputs."""
        m = self.modules
        dev = self.options.device
        ln1, ln2 = m["input_layernorm"], m["post_attention_layernorm"]
        attn, mlp = m["self_attn"], m["mlp"]
        sizes = [h.shape[0] for h in hidden]
        attn_inputs = workspace.scratch_batches(sizes, m[ATTENTION_OUTPUT].in_features)

        acc = HessianAccumulator(m[ATTENTION_INPUTS[0]].in_features, dev)
        for h in hidden:
            acc.add(ln1(h))
        self._quantize(ATTENTION_INPUTS, acc)

        acc = HessianAccumulator(m[ATTENTION_OUTPUT].in_features, dev)
        for h, kw, cache in zip(hidden, kwargs, attn_inputs, strict=True):
            def keep(x: torch.Tensor, cache: torch.Tensor = cache) -> None:
                acc.add(x)
                cache.copy_(x)
            _run_until(attn, m[ATTENTION_OUTPUT],
                       lambda h=h, kw=kw: attn(hidden_states=ln1(h), **kw), keep)
        self._quantize((ATTENTION_OUTPUT,), acc)

        acc = HessianAccumulator(m[MLP_INPUTS[0]].in_features, dev)
        for h, x in zip(hidden, attn_inputs, strict=True):
            h.add_(m[ATTENTION_OUTPUT](x.to(h.dtype)))  # h2 = h + attention, in place
            acc.add(ln2(h))
        self._quantize(MLP_INPUTS, acc)

        # o_proj's inputs are consumed: their buffer now holds down_proj's
        mlp_inputs = workspace.scratch_batches(sizes, m[MLP_OUTPUT].in_features)
        acc = HessianAccumulator(m[MLP_OUTPUT].in_features, dev)
        # the MLP's intermediates are the widest activations: run it MLP_CHUNK samples at a time
        for h2, cache in zip(_chunks(hidden), _chunks(mlp_inputs), strict=True):
            def keep_mlp(x: torch.Tensor, cache: torch.Tensor = cache) -> None:
                acc.add(x)
                cache.copy_(x)
            _run_until(mlp, m[MLP_OUTPUT], lambda h2=h2: mlp(ln2(h2)), keep_mlp)
        self._quantize((MLP_OUTPUT,), acc)

        for h, x in zip(hidden, mlp_inputs, strict=True):
            h.add_(m[MLP_OUTPUT](x.to(h.dtype)))  # the block's output, the next block's input
        return self.result


MLP_CHUNK = 2  # samples per MLP forward in stage 4: 25 MB of intermediates, not 100 (SmolLM2)


def _chunks(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part for batch in batches for part in batch.split(MLP_CHUNK)]


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
    reference = block_output(work(x, **small_kw))
    h2 = x + m["self_attn"](hidden_states=m["input_layernorm"](x), **small_kw)[0]
    staged = h2 + m["mlp"](m["post_attention_layernorm"](h2))
    if not torch.allclose(reference, staged, rtol=1e-4, atol=1e-4 * float(reference.abs().max())):
        raise QuantmillError(
            f"gptq: {type(block).__name__} does not compute h + attn(ln1(h)) then "
            "h2 + mlp(ln2(h2)); this architecture needs its own staging"
        )


@dataclass
class LayerwiseResult:
    weights: dict[str, QuantizedWeight]
    stats: dict[str, GPTQStats]
    #: state-dict key -> tensor for float parameters block tuning changed (norm weights)
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    #: block name -> block tuning's losses
    tuning: dict[str, TuningStats] = field(default_factory=dict)


def quantize_model_layerwise(
    model: torch.nn.Module, plan: dict[str, ModuleQuantSpec], input_ids: torch.Tensor,
    options: LayerwiseOptions,
) -> LayerwiseResult:
    """GPTQ every planned linear of every decoder block, block by block (each block tuned
    afterwards when ``options.tuning`` is enabled)."""
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

    workspace = Workspace.allocate(input_ids, layers[0], options.device, options.activation_cache)
    hidden, kwargs = capture_block_inputs(model, layers[0], input_ids, options.batch_size,
                                          options.device, into=workspace.hidden)
    kwargs = [{k: v for k, v in kw.items() if k not in ("use_cache", "past_key_values",
                                                         "past_key_value")} for kw in kwargs]
    fetcher = deferred.fetcher_of(model)
    verify_staging(layers[0], hidden[0], kwargs[0], options.device, f"{prefix}.0", fetcher)
    packed: dict[str, tuple[QuantizedWeight, torch.Tensor | None]] = {}
    out = LayerwiseResult({}, {})
    tuning = options.tuning.enabled
    if tuning:
        # the float stream (targets) and a copy of each block's quantized-stream inputs
        float_hidden = list(torch.split(workspace.hidden.clone(), [h.shape[0] for h in hidden]))
        block_inputs = [h.clone() for h in hidden]
    with progress_bar("quantize (gptq)", total=len(layers)) as advance:
        for i, block in enumerate(layers):
            quantizer = BlockQuantizer(block, per_block[i], options, f"{prefix}.{i}", fetcher)
            if tuning:
                quantizer.forward_in_place(float_hidden, kwargs)  # float block, float stream
                for saved, h in zip(block_inputs, hidden, strict=True):
                    saved.copy_(h)
            result = quantizer.run(hidden, kwargs, workspace)
            if tuning:
                quantizer.tune(block_inputs, float_hidden, kwargs, hidden)
                if result.tuning is not None:
                    out.tuning[f"{prefix}.{i}"] = result.tuning
            for local, qw in result.weights.items():
                packed[f"{prefix}.{i}.{local}"] = _pack_codes(qw)
                out.stats[f"{prefix}.{i}.{local}"] = result.stats[local]
            for local, value in result.float_overrides.items():
                out.float_overrides[f"{prefix}.{i}.{local}"] = value.detach().cpu()
            del result, quantizer
            # the block's working copy and temporaries are freed (reference counting: the block
            # holds no cycles, so no garbage collection); without handing their pages back,
            # the long-lived results allocated among them pin a little more each block
            release_free_memory(collect=False)
            advance(1)
    del workspace, hidden, kwargs
    if tuning:
        del float_hidden, block_inputs
    release_free_memory()
    out.weights = {name: _unpack_codes(*item) for name, item in packed.items()}
    return out


def _pack_codes(qw: QuantizedWeight) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Finished modules wait for the end of the pass with their integers packed several to a
    byte (2 per byte at 3-4 bits, 4 at 2 bits), so the results of earlier blocks add up less
    while later blocks still need their activations (SmolLM2-135M at 4 bits: 53 MB instead of
    106 MB). Plain uint8 shifts: a few milliseconds per module, where the checkpoint's int32
    word packing cost seconds per block. Unpacked once the activations are freed."""
    per_byte = 8 // qw.bits
    rows, width = qw.intweight.shape
    if per_byte < 2 or width % per_byte:
        return qw, None
    codes = qw.intweight.to(torch.uint8).reshape(rows, width // per_byte, per_byte)
    packed = codes[..., 0].clone()
    for j in range(1, per_byte):
        packed |= codes[..., j] << (j * qw.bits)
    return replace(qw, intweight=qw.intweight.new_empty(rows, 0)), packed


def _unpack_codes(qw: QuantizedWeight, packed: torch.Tensor | None) -> QuantizedWeight:
    if packed is None:
        return qw
    per_byte, mask = 8 // qw.bits, (1 << qw.bits) - 1
    rows, cols = packed.shape
    codes = torch.empty(rows, cols, per_byte, dtype=torch.uint8)
    for j in range(per_byte):
        codes[..., j] = (packed >> (j * qw.bits)) & mask
    return replace(qw, intweight=codes.reshape(rows, cols * per_byte))
