"""Which weight format and compute dtype is fastest on this machine: the policy (LoRA r16 on every linear layer)
loaded as NF4 4-bit with fp32 compute, 4-bit with bf16 compute, unquantized bf16 and unquantized fp32, measured
side by side in one process, round-robin, so every format sees the same machine state.

    python benchmarks/bench_dtype.py [--rounds 3] [--seqs 8] [--tokens 256] [--samples 16] [--new-tokens 32]

Per format: a training forward + backward of ``--seqs`` sequences × ``--tokens`` tokens, and sampling
``--samples`` responses of ``--new-tokens`` tokens (the evaluation's and PPO's ``generate``). Prints the best
round of each, the step's FLOP/s as a fraction of this machine's own matmul peak in its compute dtype (FLOPs as
``compute.py`` counts them: 4N per token for LoRA on a frozen base, 2N forward and 2N for the activation
gradients), and sampling tokens/s. The main job's model settings (grids/main.yaml) come from this table.
"""

import argparse
import time

import torch

from workbench.core import compute
from workbench.modeling import models, sampling


FORMATS = {  # name -> ModelConfig overrides
    "4-bit, fp32 compute": dict(load_in_4bit=True, dtype="float32"),
    "4-bit, bf16 compute": dict(load_in_4bit=True, dtype="bfloat16"),
    "bf16 (unquantized)": dict(load_in_4bit=False, dtype="bfloat16"),
    "fp32 (unquantized)": dict(load_in_4bit=False, dtype="float32"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=models.EMBEDDED_POLICY)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    native, hardware = models.native_bf16()
    print(f"{hardware}; {torch.get_num_threads()} threads; model {args.model}", flush=True)
    peak = {d: compute.peak_matmul_flops(d) for d in (torch.float32, torch.bfloat16)}
    print(f"peak matmul: fp32 {peak[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s", flush=True)

    loaded = {}
    for name, kw in FORMATS.items():
        model, tok = models.load_policy(models.ModelConfig(model_name_or_path=args.model, **kw))
        loaded[name] = (model, tok, models.compute_dtype(kw["dtype"]))
    tok = next(iter(loaded.values()))[1]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, len(tok) - 100, (args.seqs, args.tokens), generator=g)
    attn = torch.ones_like(ids)
    prompts = [torch.randint(100, len(tok) - 100, (64,), generator=g).tolist() for _ in range(args.samples)]
    n_params = compute.matmul_params(next(iter(loaded.values()))[0])

    step, sample = {n: [] for n in loaded}, {n: [] for n in loaded}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (model, tok, dtype) in loaded.items():
            model.train()
            t = time.perf_counter()
            with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                                enabled=dtype == torch.bfloat16):
                out = model(input_ids=ids, attention_mask=attn).logits
                loss = out.float().logsumexp(-1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
            dt_step = time.perf_counter() - t
            t = time.perf_counter()
            sampling.generate(model, tok, prompts, args.new_tokens, 0.7, generator_seed=r)
            dt_sample = time.perf_counter() - t
            if r:
                step[name].append(dt_step)
                sample[name].append(dt_sample)
            print(f"  round {r} {name:<22} step {dt_step:6.2f} s   sampling {dt_sample:6.2f} s", flush=True)

    flops = 4 * n_params * args.seqs * args.tokens  # compute.py's count for LoRA on a frozen base
    print(f"\nbest of {args.rounds} rounds ({args.seqs} × {args.tokens} tokens forward+backward; {args.samples} × "
          f"{args.new_tokens} tokens sampled):")
    print(f"{'format':<22} {'step s':>7} {'% of peak':>10} {'sample s':>9} {'tokens/s':>9}")
    for name, (_, _, dtype) in loaded.items():
        s, g_ = min(step[name]), min(sample[name])
        print(f"{name:<22} {s:7.2f} {flops / s / peak[dtype]:10.1%} {g_:9.2f} {args.samples * args.new_tokens / g_:9.1f}")


if __name__ == "__main__":
    main()
