"""The C allocator's policy (workbench/core/malloc.py) side by side: glibc's default (freed large blocks go back to the
kernel) against the workbench's (freed memory kept and reused), each in its own process since the policy is set
per process, alternating rounds so both see the same machine state.

    python benchmarks/bench_malloc.py [--rounds 2] [--steps 4] [--pairs-per-step 4] [--max-length 192]
                                      [--prompts 16] [--new-tokens 32]

Each round runs, in a fresh process: DPO steps on the embedded model exactly as ``train("dpo", ...)`` builds them
(the first step is a warm-up and not counted), then sampling of ``--prompts`` held-out prompts x 2 samples as the
evaluation samples them. Prints the time of each, the process's user and system CPU time and minor page faults,
and the ratio default/kept.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def child(args) -> dict:
    from workbench.modeling import data, models, sampling
    from workbench.core import malloc
    from workbench.training import train
    from workbench.modeling.runs import Run

    malloc.keep_freed_memory()  # as every entry point does (WORKBENCH_MALLOC=system: glibc's default)

    mcfg = models.ModelConfig(model_name_or_path=models.EMBEDDED_POLICY, dtype="auto", load_in_4bit=True)
    cfg = train.DPOArgs(model=mcfg, per_device_train_batch_size=args.pairs_per_step, max_length=args.max_length,
                        max_steps=args.steps + 1, runs_dir=tempfile.mkdtemp(), run_name="bench", logging_steps=1)
    tok = models.load_tokenizer(mcfg.model_name_or_path)
    examples, _ = data.load_hh("harmless-base", "test", tokenizer=tok, max_length=args.max_length)
    dataset = train._dataset("pairs", examples[: (args.steps + 1) * args.pairs_per_step])
    policy, tok = models.load_policy(mcfg)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    with Run("bench", "malloc", seed=0, config={}, root=cfg.runs_dir) as run:
        trainer = train.build_trainer("dpo", cfg, policy, tok, dataset, run)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step reads it
        policy.train()
        steps = []
        for batch in trainer.get_train_dataloader():
            t = time.perf_counter()
            trainer.training_step(policy, batch)
            steps.append(time.perf_counter() - t)
    prompts = data.prompt_view(examples[-args.prompts:])
    policy.eval()
    t = time.perf_counter()
    sampling.sample_completions(policy, tok, prompts, n_samples=2, max_new_tokens=args.new_tokens,
                                max_prompt_length=args.max_length)
    sample_s = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"policy": malloc.policy()["policy"], "step_s": statistics.mean(steps[1:]), "sample_s": sample_s,
            "user_s": usage.ru_utime - usage0.ru_utime, "sys_s": usage.ru_stime - usage0.ru_stime,
            "minor_faults": usage.ru_minflt - usage0.ru_minflt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed DPO steps per round, after one warm-up step")
    ap.add_argument("--pairs-per-step", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    from workbench.modeling import models
    print(f"{models.native_bf16()[1]}, {os.cpu_count()} cores; DPO {args.pairs_per_step} pairs x <= {args.max_length} "
          f"tokens per step, sampling {args.prompts} prompts x 2 x {args.new_tokens} tokens")
    results = {"system": [], "keep": []}
    for r in range(args.rounds):
        for setting in ("system", "keep"):
            env = dict(os.environ, WORKBENCH_MALLOC=setting)
            out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True,
                                 text=True, check=True).stdout
            res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            results[setting].append(res)
            print(f"round {r} {res['policy']:>17}: DPO step {res['step_s']:.2f} s, sampling {res['sample_s']:.2f} s, "
                  f"user {res['user_s']:.1f} s, system {res['sys_s']:.1f} s, minor faults {res['minor_faults']:,}",
                  flush=True)
    mean = {k: {m: statistics.mean(r[m] for r in v) for m in ("step_s", "sample_s", "sys_s", "minor_faults")}
            for k, v in results.items()}
    sys_, keep = mean["system"], mean["keep"]
    print(f"mean over {args.rounds} rounds: DPO step {sys_['step_s']:.2f} s -> {keep['step_s']:.2f} s "
          f"({sys_['step_s'] / keep['step_s']:.2f}x), sampling {sys_['sample_s']:.2f} s -> {keep['sample_s']:.2f} s "
          f"({sys_['sample_s'] / keep['sample_s']:.2f}x), system time {sys_['sys_s']:.1f} s -> {keep['sys_s']:.1f} s, "
          f"minor faults {sys_['minor_faults']:,.0f} -> {keep['minor_faults']:,.0f}")


if __name__ == "__main__":
    main()
