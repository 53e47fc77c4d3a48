"""A run's adapter as a portable artifact: the tokenizer (with its chat template) saved beside it, the base model
recorded by a name another machine resolves (``models.portable_name``; the local path kept in ``workbench.json``), a
model card (README.md) written from the run's config, summary and evaluations, and ``push_to_hub``.

The folder then loads anywhere with PEFT and transformers alone::

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer
    model = AutoPeftModelForCausalLM.from_pretrained("runs/dpo__default__s0__.../adapter")
    tokenizer = AutoTokenizer.from_pretrained("runs/dpo__default__s0__.../adapter")
"""

from __future__ import annotations

import json
from pathlib import Path

from ..modeling.models import portable_name
from ..modeling.runs import write_json


def make_portable(adapter_dir: Path, tokenizer, model_cfg: dict) -> None:
    """The tokenizer beside the adapter, and the base recorded by its portable name (the path it was loaded from
    here in ``workbench.json``)."""
    adapter_dir = Path(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    here = cfg.get("base_model_name_or_path")
    cfg["base_model_name_or_path"] = portable_name(model_cfg["model_name_or_path"])
    write_json(cfg_path, cfg)
    write_json(adapter_dir / "workbench.json", {"base_model": model_cfg["model_name_or_path"], "base_loaded_from": here,
                                                "base_model_name_or_path": cfg["base_model_name_or_path"],
                                                "load_in_4bit": model_cfg.get("load_in_4bit")})


def _row(name: str, value) -> str:
    return f"| {name} | {value} |"


def model_card(run_path: Path) -> str:
    """README.md of a run's adapter, from its folder: what it is, how it was trained, what it measured."""
    run_path = Path(run_path)
    cfg = json.loads((run_path / "config.json").read_text())
    summary = json.loads((run_path / "summary.json").read_text()) if (run_path / "summary.json").exists() else {}
    method, base = run_path.name.split("__")[0], portable_name(cfg.get("model", {}).get("model_name_or_path", "?"))
    data = cfg.get("data") or {}
    rows = [_row("method", method), _row("β", cfg.get("beta", "–")), _row("loss", cfg.get("loss_type", "–")),
            _row("seed", cfg.get("seed")), _row("base model", f"`{base}` (4-bit NF4: {cfg.get('model', {}).get('load_in_4bit')})"),
            _row("starting policy and reference", f"`{Path(cfg['sft_run']).name}`" if cfg.get("sft_run") else "the base"),
            _row("reward model", f"`{Path(str(cfg['reward_model'])).name}`" if cfg.get("reward_model") else "–"),
            _row("data", f"`{data.get('source') or 'HH-RLHF'}` {data.get('subset', '')}/{data.get('split', '')}, "
                 f"half {data.get('half') or 'all'}, n_train {data.get('n_train') or 'all'}, held out "
                 f"{data.get('heldout_fraction')} (split_seed {data.get('split_seed')})"),
            _row("steps", summary.get("train/steps", "–")), _row("training pairs / prompts", summary.get("train/pairs", "–"))]
    evals = []
    for folder in sorted((run_path / "eval").iterdir()) if (run_path / "eval").is_dir() else []:
        if not (folder / "summary.json").exists():  # not a complete evaluation
            continue
        s, c = (json.loads((folder / f"{name}.json").read_text()) for name in ("summary", "config"))

        def ci(m):
            return "–" if s.get(m) is None else (f"{s[m]:.3f}" + (f" [{s[m + '_lo']:.3f}, {s[m + '_hi']:.3f}]"
                                                                 if s.get(m + "_lo") is not None else ""))
        evals.append(f"| `{folder.name}` | {c.get('n_prompts')} × {c.get('n_samples')} at T = {c.get('temperature')}, "
                     f"≤ {c.get('max_new_tokens')} tokens | {c.get('gold_reward_model')} | {ci('eval/gold')} | "
                     f"{ci('eval/kl')} | {ci('eval/gold_vs_sft')} |")
    ev_text = ("\n".join(["| evaluation | samples | gold | gold reward | KL(π‖π_ref) | gold − SFT (paired) |",
                          "|---|---|---|---|---|---|", *evals]) if evals else
               "Not evaluated yet (`python -m workbench evaluate <runs>` writes `eval/` and updates this card).")
    return "\n".join([
        "---", f"base_model: {base}", "library_name: peft", f"tags: [workbench, {method}, trl, lora]", "---", "",
        f"# {run_path.name}", "",
        f"A LoRA adapter trained by the workbench with **{method}** on `{base}`. Load it with PEFT and transformers alone:",
        "", "```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
        "model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")", "```", "",
        "| | |", "|---|---|", *rows, "",
        "## Evaluation", "", ev_text, "",
        "Intervals: 95% cluster bootstrap over the evaluation's prompts. The run folder (config.json, summary.json, "
        "metrics.jsonl, eval/) holds everything this card says.",
        "" if base == cfg.get("model", {}).get("model_name_or_path") else
        f"\nThe base was the workbench's embedded copy of `{base}` (`{cfg['model']['model_name_or_path']}`; for "
        "SmolLM2 a Q4_1 GGUF, dequantized), so on the hub's own weights the adapter sits on slightly different "
        "numbers.", ""])


def write_model_card(run_path: Path) -> Path | None:
    """Write (or refresh) ``<run>/adapter/README.md``; None when the run has no adapter."""
    adapter = Path(run_path) / "adapter"
    if not (adapter / "adapter_config.json").exists():
        return None
    out = adapter / "README.md"
    out.write_text(model_card(run_path))
    return out


def push_to_hub(run_path: Path, repo_id: str, *, private: bool = True, token: str | None = None) -> str:
    """Upload a run's adapter folder (adapter, tokenizer, card) to the hub as ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi

    adapter = Path(run_path) / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{adapter} does not exist: only runs that trained an adapter can be pushed.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(adapter),
                             commit_message=f"workbench: {Path(run_path).name}")
    return str(getattr(info, "commit_url", info))
