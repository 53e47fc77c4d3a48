"""Inference copies of a (4-bit, LoRA) policy: what the sampler draws from and scores with.

A 4-bit + LoRA model dequantizes every 4-bit weight at every call; sampling calls it once per decoding step, so on
a CPU a copy whose weights are dequantized once samples faster (``benchmarks/bench_sampling.py``). Two forms:

- ``inference_copy(model)``, **exact**: the policy's function up to the order of floating-point sums (logits within
  1e-4 in float32; tests/test_gold.py), each linear layer computing as bitsandbytes' ``Linear4bit`` and peft's LoRA
  layer do. It holds the LoRA matrices of **every** adapter of the model, one active at a time
  (``use_adapter``), so one copy is both the policy and its reference (``logprobs.reference_adapter`` switches it
  as it switches a peft model) and the reference's log-probs of the samples need no pass through the 4-bit model.
- ``inference_copy(model, dtype=...)``, **inexact**: one adapter merged into the weights, every weight and
  activation in ``dtype``: faster again, a policy that differs by rounding; for samples whose log-probs are not
  needed (the gold-labelled dataset's texts).

Training keeps the 4-bit + LoRA model; a copy is made per use and costs one dequantized copy of the weights (~270 MB
in bf16 for the 135M model).
"""

from __future__ import annotations

import contextlib
import copy as _copy

import torch


QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' quantized linear layers, by class name


def _quantized(module) -> bool:
    return type(module).__name__ in QUANTIZED_LAYERS


class InferenceLinear(torch.nn.Module):
    """A 4-bit + LoRA linear layer as plain tensors: y = x·Wᵀ + b in W's dtype, cast back to the input's dtype, plus
    the active adapter's LoRA update (x·Aᵀ)·Bᵀ·scaling in the adapter's dtype: the arithmetic of bitsandbytes'
    ``Linear4bit`` (which casts its input to the compute dtype and its output back) and of peft's LoRA layer on top
    of it, with the weight dequantized once instead of at every call. ``loras``: adapter name -> (A, B, scaling);
    ``active``: the adapter applied (None: the base alone)."""

    def __init__(self, weight, bias=None, loras: dict | None = None, active: str | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.lora_a = torch.nn.ParameterDict()
        self.lora_b = torch.nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        for name, (a, b, scaling) in (loras or {}).items():
            self.lora_a[name] = torch.nn.Parameter(a, requires_grad=False)
            self.lora_b[name] = torch.nn.Parameter(b, requires_grad=False)
            self.scaling[name] = scaling
        self.active = active

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        out = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)
        if self.active is not None and self.active in self.scaling:
            a, b = self.lora_a[self.active], self.lora_b[self.active]
            h = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b)
            out = out + (h * self.scaling[self.active]).to(out.dtype)
        return out


def is_copy(model) -> bool:
    """Whether ``model`` is an exact inference copy (holds its adapters and switches between them)."""
    return hasattr(model, "inference_adapters")


@contextlib.contextmanager
def use_adapter(model, name: str | None):
    """Context in which the exact inference copy ``model`` computes with adapter ``name`` (None: the base alone)."""
    if name is not None and name not in model.inference_adapters:
        raise ValueError(f"use_adapter: the copy holds the adapters {list(model.inference_adapters)}, not {name!r}")
    layers = [m for m in model.modules() if isinstance(m, InferenceLinear)]
    before = model.active_adapter_name
    for m in layers:
        m.active = name
    model.active_adapter_name = name
    try:
        yield model
    finally:
        for m in layers:
            m.active = before
        model.active_adapter_name = before


def for_sampling(model):
    """The model to sample ``model`` from: its exact inference copy, with the same adapter active, where ``model``
    holds 4-bit weights on a CPU (there bitsandbytes dequantizes them at every decoding step; the copy samples the same
    function ~1.5-2x faster, benchmarks/bench_sampling.py); ``model`` itself elsewhere (a GPU's 4-bit kernels do
    not pay that, and a dequantized copy of a large model would cost its full memory). Samples and the log π read
    off the decoding steps are the policy's either way (tests/test_decoding.py)."""
    if not any(_quantized(m) for m in model.modules()) or next(model.parameters()).device.type != "cpu":
        return model
    active = getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
    if isinstance(active, (list, tuple)):
        active = active[0] if len(active) == 1 else None
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if active is not None and layers and layers[0].disable_adapters:
        active = None  # inside peft's disable_adapter(): the base alone
    copy = inference_copy(model, active)
    _carry_hooks(model, copy)
    return copy


def _carry_hooks(model, copy) -> None:
    """The forward pre-hooks on ``model``'s backbone (``compute.TokenCounter``'s) registered on the copy's too, so the
    tokens the copy samples are counted as the model's own would be."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    src, dst = getattr(base, base.base_model_prefix), getattr(copy, copy.base_model_prefix)
    for key, hook in src._forward_pre_hooks.items():
        dst.register_forward_pre_hook(hook, with_kwargs=key in src._forward_pre_hooks_with_kwargs)


def _empty_model(config, dtype: torch.dtype):
    """The architecture of ``config`` with uninitialised weights (they are all overwritten): random initialisation
    of a 135M model costs ~1 s on two cores, more than dequantizing it."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@torch.no_grad()
def inference_copy(model, adapter: str | None = "default", dtype: torch.dtype | None = None):
    """A copy of a (4-bit, LoRA) policy to sample from, without bitsandbytes or peft: every 4-bit weight dequantized
    once (the values its 4-bit matmuls compute with, kept in their compute dtype), the LoRA matrices of every adapter
    as separate low-rank paths with ``adapter`` active (None: the base alone), every other weight (embeddings, norms,
    the output layer) as the policy holds it; each linear layer computes as the policy's does (``InferenceLinear``).
    So the copy is the policy's function up to the order of floating-point sums, and the log π that
    ``sampling.sample_completions`` reads off its decoding steps is the policy's (to 1e-4 in fp32;
    tests/test_decoding.py). ``use_adapter`` (or ``logprobs.reference_adapter``) switches it to another adapter.

    ``dtype`` (e.g. bfloat16): a faster, inexact copy instead: ``adapter`` merged into the weights and every weight
    and activation in ``dtype`` (the policy keeps its norms, embeddings and residual stream in float32). It samples
    ~1.5x faster again, from a policy that differs by rounding: on the embedded model in bf16, KL ≈ 0.003 nats per
    token to the policy (docs/gold.md). For samples whose log-probs are not needed (a gold-labelled dataset)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    src = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = _copy.deepcopy(src.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    if dtype is not None:
        return _merged_copy(src, config, adapter, dtype)
    names = list(getattr(model, "peft_config", {}))
    if adapter is not None and adapter not in names:
        raise ValueError(f"inference_copy: the model has the adapters {names}, not {adapter!r}")
    plain = _empty_model(config, torch.float32)
    own = {n: p.detach() for n, p in src.named_parameters() if "lora_" not in n and ".base_layer." not in n
           and p.is_floating_point() and p.dtype != torch.uint8}
    missing = {n for n, _ in plain.named_parameters()} - set(own)
    plain.load_state_dict(own, strict=False)
    replaced = set()
    for name, module in src.named_modules():
        base, lora = (module.get_base_layer(), module) if isinstance(module, LoraLayer) else (module, None)
        if not (isinstance(module, LoraLayer) or _quantized(module)):
            continue
        if ".base_layer" in name:
            continue
        compute = getattr(base, "compute_dtype", None) or base.weight.dtype  # a 4-bit weight computes in compute_dtype
        weight = dequantize_module_weight(base).to(compute)
        loras = {}
        if lora is not None:
            loras = {a: (lora.lora_A[a].weight.detach().clone(), lora.lora_B[a].weight.detach().clone(), lora.scaling[a])
                     for a in lora.lora_A}
        bias = None if base.bias is None else base.bias.detach().clone()
        parent, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(parent), leaf, InferenceLinear(weight, bias, loras, adapter))
        replaced |= {f"{name}.weight", f"{name}.bias"}
    plain.tie_weights()
    left = sorted(n for n in missing - replaced if not _tied(plain, n))
    if left:  # uninitialised weights would sample garbage silently
        raise RuntimeError(f"inference_copy: no weights found for {left[:5]} ({len(left)} in all)")
    plain.inference_adapters = tuple(names)
    plain.active_adapter_name = adapter
    return plain.to(next(src.parameters()).device).eval()


def _tied(model, name: str) -> bool:
    """Whether parameter ``name`` is tied to another (the output layer to the embeddings), so loading the other set it."""
    try:
        p = model.get_parameter(name)
    except AttributeError:
        return True  # replaced by an InferenceLinear
    return any(q is p for n, q in model.named_parameters(remove_duplicate=False) if n != name)


def _merged_copy(src, config, adapter: str | None, dtype: torch.dtype):
    """``inference_copy``'s inexact, faster form: every weight in ``dtype``, the LoRA update merged in."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    modules = dict(src.named_modules())
    plain = _empty_model(config, dtype)
    state = {}
    for name, _ in plain.named_parameters():
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if leaf == "bias":
                state[name] = base.bias.detach().to(dtype)
                continue
            w = dequantize_module_weight(base).float()
            if adapter is not None and adapter in module.lora_A:
                w = w + module.get_delta_weight(adapter).float()
            state[name] = w.to(dtype)
        elif module is not None and leaf == "weight" and _quantized(module):
            state[name] = dequantize_module_weight(module).to(dtype)
        else:
            state[name] = src.get_parameter(name).detach().to(dtype)
    plain.load_state_dict(state, strict=False)  # every distinct parameter is in state; tied ones are set by tie_weights
    plain.tie_weights()
    return plain.to(next(src.parameters()).device).eval()
