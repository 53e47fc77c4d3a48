"""A short known-gold main job on one CUDA GPU, 4-bit NF4 weights with bf16 compute: SFT -> a VADER-labelled
dataset -> a proxy reward model on its half "a" -> DPO, PPO and online DPO (against the proxy) on half "b" -> the evaluation by
the gold. Every stage's wall time, the GPU's peak memory and the evaluation's numbers go to <out>/gpu-smoke.json.

Used by ``scripts/gpu-check.sh`` (docs/verification.md, "On a GPU"). It checks that the GPU path runs end to end at
the main job's shapes, not what the study finds: on a machine that reaches no hub the policy is a random model of
SmolLM2-135M's shape (``--model``), so its replies are noise and the gold numbers measure nothing.

    python scripts/gpu_smoke.py --model embedded:smollm2-135m-instruct --data ../shared/data/hh-rlhf --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--data", required=True, help="the HH-RLHF folder (harmless-base/test.jsonl.gz)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scale", type=int, default=1, help="multiplies prompts and steps")
    args = ap.parse_args()
    from workbench.measurement import evaluate, results
    from workbench.modeling import models
    from workbench.training import train
    from workbench.training.gold_pairs import GoldPairsArgs
    from workbench.modeling.models import ModelConfig
    from workbench.training.online_dpo import OnlineDPOArgs
    from workbench.training.ppo import PPOArgs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    s = args.scale
    report: dict = {"model": args.model, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
                    "compute_dtype": str(models.compute_dtype("auto")), "stages": {}, "failed": []}

    def data(**kw):
        return train.DataConfig(**{"split": "test", "source": args.data, **kw})

    def stage(name, fn):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            value = fn()
            ok = True
        except Exception:  # noqa: BLE001 - recorded, and the smoke goes on with what it can still run
            value, ok = None, False
            report["failed"].append(name)
            report["stages"][name] = {"error": traceback.format_exc()[-3000:]}
            traceback.print_exc()
        if ok:
            report["stages"][name] = {"seconds": round(time.perf_counter() - t0, 1),
                                      "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                      if torch.cuda.is_available() else None}
        print(f"[gpu-smoke] {name}: {report['stages'][name].get('seconds', 'FAILED')} s", flush=True)
        (out / "gpu-smoke.json").write_text(json.dumps(report, indent=1, default=str))
        return value

    policy = ModelConfig(model_name_or_path=args.model)
    assert policy.load_in_4bit, "the smoke checks the QLoRA path: 4-bit weights"
    common = dict(model=policy, runs_dir=str(runs), seed=0)
    sft = stage("sft", lambda: train.train("sft", train.SFTArgs(
        **common, data=data(n_train=32 * s, n_score=8), max_steps=8 * s, per_device_train_batch_size=8,
        max_length=256)))
    dataset = stage("gold-pairs", lambda: train.train("gold-pairs", GoldPairsArgs(
        **common, data=data(), sft_run=str(sft), gold="vader", n_proxy_prompts=32 * s, n_policy_prompts=32 * s,
        n_eval_prompts=16 * s, samples_per_prompt=4, eval_samples_per_prompt=8, max_new_tokens=32)))
    if dataset:
        summary = json.loads((Path(dataset) / "summary.json").read_text())
        report["gold_pairs"] = {k: summary.get(k) for k in ("pairs/total", "tokens/generated", "time/sampling_s")}
        report["gold_pairs"]["sampling_tokens_per_s"] = round(summary["tokens/generated"] / summary["time/sampling_s"])
    proxy = stage("proxy", lambda: train.train("reward", train.RewardArgs(
        **{**common, "run_name": "proxy"}, data=data(source=str(dataset), half="a"), max_steps=16 * s,
        per_device_train_batch_size=16, max_length=256)))
    stage("dpo", lambda: train.train("dpo", train.DPOArgs(
        **common, data=data(source=str(dataset), half="b"), sft_run=str(sft), max_steps=8 * s,
        per_device_train_batch_size=8, max_length=256, learning_rate=5e-4, snapshots=1)))
    stage("ppo", lambda: train.train("ppo", PPOArgs(
        **common, data=data(source=str(dataset), half="b"), sft_run=str(sft), reward_model=str(proxy),
        gold_reward_model="vader", iterations=4 * s, rollout_batch_size=16, max_new_tokens=32, max_prompt_length=96,
        learning_rate=5e-4, snapshots=1)))
    stage("online-dpo", lambda: train.train("online-dpo", OnlineDPOArgs(
        **common, data=data(source=str(dataset), half="b"), sft_run=str(sft), reward_model=str(proxy),
        gold_reward_model="vader", rounds=2 * s, prompts_per_round=16, max_new_tokens=32, max_prompt_length=96,
        learning_rate=5e-4)))
    cfg = evaluate.EvalConfig(data_source=str(dataset), proxy_reward_model=str(proxy), gold_reward_model="vader",
                              n_prompts=16 * s, n_samples=2, n_pairs=64, max_new_tokens=32, max_prompt_length=96,
                              n_bootstrap=200, workers=1)
    evaluated = stage("evaluate", lambda: evaluate.evaluate_runs(runs, cfg)) if proxy else None
    if evaluated:
        table = results.results_table(evaluated, cfg.name)
        keep = [c for c in ("method", "name", "eval/gold", "eval/proxy", "eval/kl", "pairs/accuracy", "eval/ended")
                if c in table.columns]
        report["results"] = table[keep].to_dict(orient="records")
        print(table[keep].to_string(), flush=True)
    (out / "gpu-smoke.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"[gpu-smoke] failed stages: {report['failed'] or 'none'}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
