"""The evaluation's sampling throughput side by side: the code path as issue 12 found it against today's, on the same
workload, each in fresh processes, alternating rounds.

    python benchmarks/bench_sampling.py [--rounds 2] [--prompts 32] [--samples 2] [--new-tokens 32]
                                        [--max-prompt-length 192]

The workload is the main grid's evaluation of one policy: ``--prompts`` held-out prompts x ``--samples`` samples of
<= ``--new-tokens`` tokens (prompts cut to their last ``--max-prompt-length`` tokens), each sample with its per-token
log pi and log pi_ref (the policy's adapter, and a second adapter as the reference, as an arm trained from SFT has).
The embedded SmolLM2-135M in NF4 4-bit. Three settings:

- ``before``: as the evaluation sampled when issue 12 was filed: fp32 compute, batches of 8 samples in prompt order,
  log pi and log pi_ref by a full forward of every prompt + response, glibc's default allocator, all threads;
- ``now``: today's defaults: bf16 compute where the CPU has it (``dtype="auto"``), batches of 16 in order of prompt
  length, each prompt scored once for its samples (``shared_prompt_logps``), freed memory kept, all threads;
- ``now, 2 workers``: the same, the prompts split between two processes of one thread each running at once, as
  ``EvalConfig(workers=2)`` evaluates two runs at once (wall clock from the first start to the last end).

Throughput is sampled response tokens per second of wall clock, log-prob passes included.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(args) -> dict:
    import torch

    from workbench import data, evaluate, models, sampling
    from workbench.logprobs import response_logprobs

    if args.threads:
        torch.set_num_threads(args.threads)
    before = args.setting == "before"
    mcfg = models.ModelConfig(model_name_or_path=models.EMBEDDED_POLICY, load_in_4bit=True,
                              dtype="float32" if before else "auto")
    torch.manual_seed(0)  # the adapters' initial A matrices: the same model in every process
    model, tok = models.load_policy(mcfg, trainable=False)
    model.add_adapter("ref", model.peft_config["default"])  # the reference is an adapter, as an SFT run's is
    model.set_adapter("default")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # both adapters non-zero, so policy and reference differ as trained ones do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    model.eval()
    prompts, _, _ = evaluate.eval_set(data.DataConfig(split="test"), args.prompts, 0)
    prompts = prompts[args.part :: args.parts]
    if before:  # a full forward of every prompt + response, under the policy and then the reference
        def full_forward(model, prompt_ids, response, mask, groups, pad_id, temperature):
            with torch.no_grad():
                lp = response_logprobs(model, prompt_ids, response, mask, pad_id, temperature)[0].cpu()
            return [lp[k][mask[k]] for k in range(len(response))]

        sampling._sample_logps = full_forward
    start = time.time()
    records = sampling.sample_completions(model, tok, prompts, n_samples=args.samples, max_new_tokens=args.new_tokens,
                                          max_prompt_length=args.max_prompt_length, temperature=0.7,
                                          batch_size=8 if before else 16, length_sorted=not before)
    end = time.time()
    return {"start": start, "end": end, "tokens": sum(r["response_tokens"] for r in records),
            "threads": torch.get_num_threads(), "dtype": str(models.compute_dtype(mcfg.dtype))}


def run(setting: str, parts: int, threads: int, argv: list[str]) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1")
    if setting == "before":
        env["WORKBENCH_MALLOC"] = "system"
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--setting", setting, "--part", str(k), "--parts",
                               str(parts), "--threads", str(threads), *argv], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for k in range(parts)]
    got = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{setting}: a child process failed (exit {p.returncode})")
        got.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    wall = max(r["end"] for r in got) - min(r["start"] for r in got)
    tokens = sum(r["tokens"] for r in got)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "dtype": got[0]["dtype"],
            "threads": got[0]["threads"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-length", type=int, default=192)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="now", help=argparse.SUPPRESS)
    ap.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    from workbench import models

    argv = [a for a in sys.argv[1:]]
    print(f"{models.native_bf16()[1]}, {os.cpu_count()} cores; {args.prompts} prompts x {args.samples} samples x <= "
          f"{args.new_tokens} tokens, prompts' last {args.max_prompt_length} tokens")
    settings = {"before": ("before", 1, 0), "now": ("now", 1, 0), "now, 2 workers": ("now", 2, 1)}
    results = {k: [] for k in settings}
    for r in range(args.rounds):
        for name, (setting, parts, threads) in settings.items():
            res = run(setting, parts, threads, argv)
            results[name].append(res)
            print(f"round {r} {name:>15}: {res['tokens']} tokens in {res['wall_s']:.1f} s = {res['tokens_per_s']:.1f} "
                  f"tokens/s ({res['dtype']}, {parts} process(es) of {res['threads']} thread(s))", flush=True)
    tps = {k: statistics.mean(r["tokens_per_s"] for r in v) for k, v in results.items()}
    print(f"mean over {args.rounds} rounds: before {tps['before']:.1f} tokens/s; now {tps['now']:.1f} "
          f"({tps['now'] / tps['before']:.2f}x); now with 2 workers {tps['now, 2 workers']:.1f} "
          f"({tps['now, 2 workers'] / tps['before']:.2f}x)")


if __name__ == "__main__":
    main()
