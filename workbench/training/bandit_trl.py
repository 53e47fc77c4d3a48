"""TRL's own RL trainers on the analytic bandit of ``bandit.py``. The study trains its RL arms with
``trl.RLOOTrainer`` and ``trl.GRPOTrainer`` (``workbench.training.train``), not with the tabular loops of ``bandit.py``. Here
the bandit becomes a causal language model that TRL can drive end to end: its vocabulary is the bandit's prompts
and responses, a completion is one token, and the model is a logit table, so TRL's generation, log-probs, reference
model, advantages and losses all run unchanged on a policy whose optimum is known (``bandit.Bandit.optimal_policy``,
``bandit.grpo_fixed_point``). ``tests/test_oracle.py`` checks where they land; ``bandit.py``'s docstring has the table.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .bandit import Bandit

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
NEGATIVE_LOGIT = -1e4  # a logit whose probability is exactly 0 in float32 at any temperature ≤ 1


def bandit_vocabulary(bandit: Bandit) -> dict[str, int]:
    """Token → id: the special tokens, then "prompt0" … "prompt{P-1}", then "response0" … "response{K-1}"."""
    n_prompts, k = bandit.rewards.shape
    names = [*SPECIAL_TOKENS, *(f"prompt{p}" for p in range(n_prompts)), *(f"response{y}" for y in range(k))]
    return {name: i for i, name in enumerate(names)}


def bandit_tokenizer(bandit: Bandit):
    """A word-level ``PreTrainedTokenizerFast`` over ``bandit_vocabulary``, built offline; it adds no special tokens,
    so the prompt "prompt1" is one token and a completion decodes to "response3"."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel(bandit_vocabulary(bandit), unk_token=UNK))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


@functools.cache
def tabular_lm_classes():
    """(config class, model class) of the tabular causal LM, registered with transformers' Auto classes (TRL builds
    its reference model with ``AutoModelForCausalLM.from_pretrained(policy.config._name_or_path)``). Built on first
    use so that importing this module does not import transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

    class TabularLMConfig(PreTrainedConfig):
        model_type = "bandit_tabular_lm"

        def __init__(self, vocab_size: int = 16, **kwargs):
            self.vocab_size = self.hidden_size = vocab_size
            kwargs.setdefault("auto_map", {})  # TRL reads config.auto_map; {} means "not remote code"
            super().__init__(**kwargs)

    class OneHot(torch.nn.Module):
        """The "backbone": the hidden state at a position is the one-hot vector of its token, (B, T, V)."""

        def __init__(self, vocab_size: int):
            super().__init__()
            self.vocab_size = vocab_size

        def forward(self, input_ids: Tensor, **kwargs) -> BaseModelOutput:
            return BaseModelOutput(last_hidden_state=F.one_hot(input_ids, self.vocab_size).float())

    class TabularLM(PreTrainedModel, GenerationMixin):
        """logits(next | current token v) = lm_head.weight[:, v]: a free logit table, (V, V). The next token
        depends only on the current one, so the completion's first token sees only the prompt's last token."""

        config_class = TabularLMConfig
        base_model_prefix = "model"  # TRL's fused LM head runs ``self.base_model`` then ``get_output_embeddings()``

        def __init__(self, config):
            super().__init__(config)
            self.model = OneHot(config.vocab_size)
            self.lm_head = torch.nn.Linear(config.vocab_size, config.vocab_size, bias=False)
            self.post_init()

        def _init_weights(self, module):
            pass  # the table is set by ``tabular_causal_lm`` and loaded from disk, never initialised at random

        @classmethod
        def _supports_default_dynamic_cache(cls) -> bool:
            return False  # nothing to cache: generate() then re-runs the whole (tiny) sequence each step

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, logits_to_keep: int | Tensor = 0,
                    **kwargs) -> CausalLMOutput:
            hidden = self.model(input_ids).last_hidden_state  # (B, T, V)
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            return CausalLMOutput(logits=self.lm_head(hidden[:, keep]))  # (B, T or logits_to_keep, V)

    AutoConfig.register(TabularLMConfig.model_type, TabularLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(TabularLMConfig, TabularLM, exist_ok=True)
    return TabularLMConfig, TabularLM


def tabular_causal_lm(bandit: Bandit, path, temperature: float = 1.0):
    """The bandit's π_ref as a causal LM, saved (with its tokenizer) to ``path`` and loaded back from there, so that
    the reference model TRL builds from ``config._name_or_path`` is the same table.

    The table: given "prompt{p}", the logits of "response{y}" are temperature·log π_ref(y|p) and every other token's
    are NEGATIVE_LOGIT, so sampling at ``temperature`` draws from π_ref exactly and nothing but a response can
    follow a prompt. Every other token (a response, a special token) is followed by <eos> with probability 1, so a
    longer ``max_completion_length`` yields "response{y} <eos>" with the same log-prob."""
    config_cls, model_cls = tabular_lm_classes()
    vocab = bandit_vocabulary(bandit)
    n_prompts, k = bandit.rewards.shape
    first_prompt, first_response = vocab["prompt0"], vocab["response0"]
    table = torch.full((len(vocab), len(vocab)), NEGATIVE_LOGIT)  # (next, current)
    table[vocab[EOS], :] = 0.0
    table[:, first_prompt:first_prompt + n_prompts] = NEGATIVE_LOGIT
    table[first_response:first_response + k, first_prompt:first_prompt + n_prompts] = \
        temperature * bandit.reference_probs.log().T
    model = model_cls(config_cls(vocab_size=len(vocab), pad_token_id=vocab[PAD], eos_token_id=vocab[EOS],
                                 bos_token_id=None, use_cache=False))
    with torch.no_grad():
        model.lm_head.weight.copy_(table)
    model.save_pretrained(path)
    bandit_tokenizer(bandit).save_pretrained(path)
    return model_cls.from_pretrained(path)


def tabular_policy(model, bandit: Bandit, temperature: float = 1.0) -> Tensor:
    """π(y|x) (P, K) that ``model`` samples at ``temperature``: softmax over the whole vocabulary, the response
    columns kept. Their rows sum to 1 (to float precision) as long as only responses can follow a prompt."""
    vocab = bandit_vocabulary(bandit)
    n_prompts, k = bandit.rewards.shape
    first_prompt, first_response = vocab["prompt0"], vocab["response0"]
    logits = model.get_output_embeddings().weight.detach()[:, first_prompt:first_prompt + n_prompts].T  # (P, V)
    return torch.softmax(logits.float() / temperature, -1)[:, first_response:first_response + k]


def bandit_prompt_dataset(bandit: Bandit, n: int):
    """``datasets.Dataset`` of n plain-text prompts ("prompt0", "prompt1", … in turn): the study's "prompts" view."""
    import datasets

    n_prompts, _ = bandit.rewards.shape
    return datasets.Dataset.from_dict({"prompt": [f"prompt{i % n_prompts}" for i in range(n)]})


def bandit_reward_func(bandit: Bandit) -> Callable[..., list[float]]:
    """A TRL reward function: r(x, y) of each completion, x read from the prompt "prompt{x}" and y from the first
    completion token "response{y}"."""
    vocab = bandit_vocabulary(bandit)
    first_response, k = vocab["response0"], bandit.rewards.shape[1]

    def bandit_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs):
        rewards = []
        for prompt, ids in zip(prompts, completion_ids, strict=True):
            y = ids[0] - first_response
            if not 0 <= y < k:
                raise ValueError(f"completion {ids} of '{prompt}' does not start with a response token")
            rewards.append(bandit.rewards[int(prompt.removeprefix("prompt")), y].item())
        return rewards

    return bandit_reward


@contextlib.contextmanager
def small_lm_head_tiles(vocab_size: int):
    """TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) scores tokens in (N, 32768) tiles of logits, a
    buffer sized for real vocabularies; on a CPU, allocating and touching it costs ~0.1 s per call at N = 1024,
    ~300x the rest of the tabular forward and backward. The tile width only splits an exact online log-sum-exp over
    the vocabulary, and one tile covers this vocabulary at either width, so narrowing it changes no number."""
    from trl.trainer import utils as trl_utils

    name = "_CHUNKED_LOGPROB_CHUNK_SIZE"
    if not hasattr(trl_utils, name):  # another TRL: nothing to narrow, only slower
        yield
        return
    saved = getattr(trl_utils, name)
    setattr(trl_utils, name, max(64, vocab_size))
    try:
        yield
    finally:
        setattr(trl_utils, name, saved)


def trl_trainer(method: str, bandit: Bandit, beta: float, output_dir, steps: int = 100, n_prompts: int = 128,
                k: int = 4, lr: float = 0.2, seed: int = 0, **options):
    """TRL's RLOOTrainer or GRPOTrainer on the tabular LM, configured by the study's own config class
    (``train.RLOOArgs`` / ``train.GRPOArgs``), so every estimator setting not named here (temperature 0.7, clipping
    ε, advantage scaling, loss type, KL form) is the one the study runs. One optimiser step per generation batch of
    ``n_prompts`` prompts × ``k`` completions; the learning rate decays linearly to 0 over ``steps``."""
    import trl

    from . import train

    config_cls, trainer_cls = {"rloo": (train.RLOOArgs, trl.RLOOTrainer),
                               "grpo": (train.GRPOArgs, trl.GRPOTrainer)}[method]
    output_dir = Path(output_dir)
    cfg = config_cls(output_dir=str(output_dir / "trainer"), beta=beta, num_generations=k,
                     per_device_train_batch_size=n_prompts * k, max_completion_length=1, learning_rate=lr,
                     max_steps=steps, seed=seed, bf16=False, use_cpu=True, gradient_checkpointing=False,
                     logging_steps=steps, save_strategy="no", report_to="none", disable_tqdm=True, **options)
    model = tabular_causal_lm(bandit, output_dir / "pi_ref", cfg.temperature)
    return trainer_cls(model=model, reward_funcs=[bandit_reward_func(bandit)], args=cfg,
                       train_dataset=bandit_prompt_dataset(bandit, n_prompts),
                       processing_class=bandit_tokenizer(bandit))


def _train_trl(method: str, bandit: Bandit, beta: float, output_dir, **kwargs) -> Tensor:
    trainer = trl_trainer(method, bandit, beta, output_dir, **kwargs)
    with small_lm_head_tiles(len(bandit_vocabulary(bandit))):
        trainer.train()
    return tabular_policy(trainer.model, bandit, trainer.args.temperature)


def train_trl_rloo(bandit: Bandit, beta: float, output_dir, **kwargs) -> Tensor:
    """``trl.RLOOTrainer`` (Ahmadian et al. 2024, arXiv:2402.14740) from π_ref; returns the learned π (P, K).

    TRL's estimator: sequence reward r − β·Σ_t (log π_old − log π_ref) (k1, no gradient through it), advantage =
    that reward minus the mean of the other k − 1 completions of the prompt, one clipped-ratio step per batch. Its
    expected gradient is ∇(E_π[r] − β·KL(π ‖ π_ref)), so it should reach π* = ``bandit.optimal_policy(beta)``.
    ``kwargs``: ``trl_trainer``'s (steps, n_prompts, k, lr, seed, and any ``train.RLOOArgs`` field); the model,
    TRL's output and the saved π_ref go under ``output_dir``."""
    return _train_trl("rloo", bandit, beta, output_dir, **kwargs)


def train_trl_grpo(bandit: Bandit, beta: float, output_dir, **kwargs) -> Tensor:
    """``trl.GRPOTrainer`` (Shao et al. 2024, arXiv:2402.03300) from π_ref; returns the learned π (P, K).

    TRL's estimator (the study's defaults): advantage (r − group mean)/(group std + 1e-4) over the k completions of
    a prompt (``scale_rewards="group"``; "none" drops the division), the KL to π_ref as a loss term β·k3·ratio
    (``use_bias_correction_kl``), the clipped surrogate averaged over completion tokens (``loss_type="dapo"``). It
    does not maximise E_π[r] − β·KL; ``grpo_fixed_point`` gives where it should stop. ``kwargs`` as for
    ``train_trl_rloo`` (any ``train.GRPOArgs`` field, e.g. ``scale_rewards="none"``)."""
    return _train_trl("grpo", bandit, beta, output_dir, **kwargs)
