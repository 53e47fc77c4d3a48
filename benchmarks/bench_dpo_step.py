"""Step time of the workbench's DPO against raw TRL DPOTrainer: same model object, data, batch and settings,
in one process, alternating step by step so both see the same machine state.

    python benchmarks/bench_dpo_step.py [--steps 6] [--pairs-per-step 4] [--max-length 256] [--model embedded:...]
                                        [--dtype auto|float32|bfloat16] [--no-4bit]

Prints each step's time, the mean ratio workbench/TRL (goal: <= 1.02) and pairs/s; and the machine's own peak
matmul FLOP/s in the compute dtype (``compute.peak_matmul_flops``, measured in this process) beside the FLOP/s the
steps achieved (FLOPs counted by ``compute.TokenCounter``, as in every run's compute.json). The workbench's
trainer is built by ``workbench.training.train.build_trainer``, exactly as ``train("dpo", ...)`` builds it.
"""

import argparse
import statistics
import tempfile
import time

import torch
import trl

from workbench.modeling import data, models
from workbench.training import train
from workbench.core.compute import TokenCounter, peak_matmul_flops
from workbench.modeling.runs import Run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pairs-per-step", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--model", default=models.EMBEDDED_POLICY)
    ap.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 where native), float32, bfloat16")
    ap.add_argument("--no-4bit", action="store_true", help="an unquantized base instead of NF4 4-bit")
    args = ap.parse_args()

    mcfg = models.ModelConfig(model_name_or_path=args.model, dtype=args.dtype, load_in_4bit=not args.no_4bit)
    cfg = train.DPOArgs(model=mcfg, per_device_train_batch_size=args.pairs_per_step,
                        max_length=args.max_length, max_steps=args.steps, runs_dir=tempfile.mkdtemp(), run_name="bench",
                        logging_steps=1)
    tok = models.load_tokenizer(args.model)
    examples, _ = data.load_hh("harmless-base", "test", tokenizer=tok, max_length=args.max_length)
    dataset = train._dataset("pairs", examples[: args.steps * args.pairs_per_step])
    policy, tok = models.load_policy(cfg.model)

    with Run("bench", "dpo-step", seed=0, config={}, root=cfg.runs_dir) as run:
        ours = train.build_trainer("dpo", cfg, policy, tok, dataset, run)
        raw_args = trl.DPOConfig(**{k: getattr(cfg, k) for k in (
            "beta", "loss_type", "learning_rate", "per_device_train_batch_size", "max_length", "max_steps", "seed",
            "bf16", "use_cpu", "gradient_checkpointing", "logging_steps", "report_to", "save_strategy")}, output_dir=tempfile.mkdtemp())
        policy.delete_adapter("ref")  # each trainer adds its own frozen copy of the starting adapter as "ref"
        raw = trl.DPOTrainer(model=policy, args=raw_args, train_dataset=dataset, processing_class=tok)
        for trainer in (ours, raw):  # set by Trainer.train(); training_step (forward + backward) reads it
            trainer.current_gradient_accumulation_steps = 1
        batches = list(ours.get_train_dataloader())
        dtype = models.compute_dtype(mcfg.dtype)
        native, hardware = models.native_bf16()
        print(f"model {args.model} ({'4-bit' if mcfg.load_in_4bit else 'unquantized'}, compute {dtype}, TRL bf16 {cfg.bf16}), "
              f"{args.pairs_per_step} pairs/step, max_length {args.max_length}, {hardware}, {torch.get_num_threads()} threads")
        times = {"workbench": [], "trl": []}
        counter = TokenCounter()
        counter.attach(policy)
        flops = []
        for i, batch in enumerate(batches):
            order = [("workbench", ours), ("trl", raw)] if i % 2 == 0 else [("trl", raw), ("workbench", ours)]
            for name, trainer in order:  # alternate who goes first
                before = counter.flops()["total"]
                t = time.perf_counter()
                with trainer.accelerator.autocast():  # as Trainer.train() runs it: bf16 autocast when cfg.bf16
                    trainer.training_step(policy, batch)
                times[name].append(time.perf_counter() - t)
                flops.append(counter.flops()["total"] - before)
                policy.zero_grad(set_to_none=True)
            print(f"  step {i}: workbench {times['workbench'][-1]:.2f} s   trl {times['trl'][-1]:.2f} s")
        counter.detach()
    w, r = statistics.mean(times["workbench"][1:]), statistics.mean(times["trl"][1:])  # first step warms up
    step_flops = statistics.mean(flops[2:])
    peak = {d: peak_matmul_flops(d) for d in (torch.float32, torch.bfloat16)}
    print(f"mean step (steps 1..{len(batches) - 1}): workbench {w:.3f} s, trl {r:.3f} s")
    print(f"ratio workbench/trl = {w / r:.3f}  (goal <= 1.02)")
    print(f"pairs/s: workbench {args.pairs_per_step / w:.2f}, trl {args.pairs_per_step / r:.2f}")
    print(f"peak matmul on this machine: fp32 {peak[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    print(f"achieved: {step_flops:.3g} FLOPs/step (compute.TokenCounter) / {w:.2f} s = {step_flops / w / 1e9:.1f} GFLOP/s "
          f"= {step_flops / w / peak[dtype]:.1%} of the {str(dtype).removeprefix('torch.')} peak  (goal on an AMX CPU: >= 25%)")


if __name__ == "__main__":
    main()
