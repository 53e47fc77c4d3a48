"""Cost of one PPO iteration, broken into generation / scoring / training, with tokens/s of generation; and, in
the same process on the same model and prompts, one TRL RLOO step with the same number of samples (its cost is
generation + one policy update, no critic).

    python benchmarks/bench_ppo.py [--iterations 3] [--batch 8] [--new-tokens 16] [--model embedded:...]

The reward model is the embedded MiniLM encoder with an untrained head (its score does not matter for cost).
Prints per-phase seconds (iteration 0 is warm-up and left out of the means), the phases' shares, and the ratio
PPO iteration / RLOO step.
"""

import argparse
import statistics
import tempfile
import time

from workbench.modeling import data, models, rewards
from workbench.training import ppo, train
from workbench.modeling.runs import load_run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="prompts (= responses) per iteration")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--model", default=models.EMBEDDED_POLICY)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    args = ap.parse_args()
    if args.iterations < 2:
        ap.error("--iterations must be >= 2 (iteration 0 is warm-up)")

    reward = rewards.load_reward(models.EMBEDDED_REWARD_BACKBONE, name="untrained-minilm")
    runs = tempfile.mkdtemp(prefix="bench-ppo-")
    dcfg = data.DataConfig(split="test", n_train=64, n_score=2, max_length=512)
    mcfg = models.ModelConfig(model_name_or_path=args.model)
    print(f"model {args.model} (4-bit: {mcfg.load_in_4bit}), device {models.device()}, {args.batch} responses × "
          f"≤ {args.new_tokens} new tokens, {args.ppo_epochs} PPO epochs", flush=True)

    cfg = ppo.PPOArgs(model=mcfg, data=dcfg, runs_dir=runs, iterations=args.iterations, rollout_batch_size=args.batch,
                      max_new_tokens=args.new_tokens, max_prompt_length=256, ppo_epochs=args.ppo_epochs)
    metrics = load_run(train.train("ppo", cfg, reward_fn=reward)).metrics.iloc[1:]

    rloo_cfg = train.RLOOArgs(model=mcfg, data=dcfg, runs_dir=runs, max_steps=args.iterations,
                              per_device_train_batch_size=args.batch, num_generations=4,
                              max_completion_length=args.new_tokens)
    t0 = time.perf_counter()
    rloo = load_run(train.train("rloo", rloo_cfg, reward_fn=reward))
    steps = rloo.metrics.dropna(subset=["loss"]).iloc[1:]

    phases = {k: statistics.mean(metrics[f"time/{k}_s"]) for k in ("generation", "scoring", "training")}
    total = sum(phases.values())
    print(f"\nPPO, mean over iterations 1..{args.iterations - 1}:")
    for k, v in phases.items():
        print(f"  {k:<11} {v:7.2f} s  ({v / total:4.0%})")
    print(f"  {'total':<11} {total:7.2f} s   generation {statistics.mean(metrics['tokens/generated_per_s']):.1f} tokens/s")
    rloo_step = statistics.mean(steps["step_time"])
    print(f"\nRLOO (TRL) step, same number of samples: {rloo_step:.2f} s  (whole run {time.perf_counter() - t0:.0f} s)")
    print(f"ratio PPO iteration / RLOO step: {total / rloo_step:.2f}")


if __name__ == "__main__":
    main()
