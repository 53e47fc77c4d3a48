"""Batched, length-bucketed per-sample scoring against a one-pair-at-a-time loop (chosen and rejected of a pair
in one batch), same model and pairs,
in one process, alternating rounds.

    python benchmarks/bench_scoring.py [--pairs 16] [--batch-size 8] [--rounds 2] [--model embedded:...]

Prints both times, the speed-up (goal >= 2x) and pairs/s, and checks both give the same numbers.
"""

import argparse
import time

from workbench.modeling import data, logprobs, models, scoring


def plain_pair(policy, tok, ex, beta=0.1):
    """The baseline: one pair, two full sequences, no sharing."""
    p, (c, r) = models.encode_many(tok, ex["prompt"], [ex["chosen"], ex["rejected"]])
    pol = logprobs.completion_logps(policy, [p, p], [c, r], pad_id=tok.pad_token_id, batch_size=2)
    ref = logprobs.completion_logps(policy, [p, p], [c, r], pad_id=tok.pad_token_id, batch_size=2, reference=True)
    margin = beta * ((pol.sum[0] - ref.sum[0]) - (pol.sum[1] - ref.sum[1])).item()
    return {"margin": margin, "policy_chosen_logp": pol.sum[0].item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--model", default=models.EMBEDDED_POLICY)
    args = ap.parse_args()

    policy, tok = models.load_policy(models.ModelConfig(model_name_or_path=args.model))
    examples, _ = data.load_hh("harmless-base", "test", tokenizer=tok, max_length=args.max_length)
    pairs = examples[: args.pairs]
    print(f"model {args.model}, {len(pairs)} pairs, device {models.device()}")
    batched, looped = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        a = scoring.score_pairs(policy, tok, pairs, batch_size=args.batch_size)
        batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = [plain_pair(policy, tok, ex) for ex in pairs]
        looped.append(time.perf_counter() - t)
        print(f"  round {r}: batched {batched[-1]:.1f} s   one at a time {looped[-1]:.1f} s")
    worst = max(abs(x["margin"] - y["margin"]) + abs(x["policy_chosen_logp"] - y["policy_chosen_logp"]) for x, y in zip(a, b))
    bt, lt = min(batched), min(looped)
    print(f"best of {args.rounds}: batched {bt:.2f} s ({len(pairs) / bt:.2f} pairs/s), "
          f"one at a time {lt:.2f} s ({len(pairs) / lt:.2f} pairs/s)")
    print(f"speed-up = {lt / bt:.2f}x  (goal >= 2x); max |difference| between the two = {worst:.2e}")


if __name__ == "__main__":
    main()
