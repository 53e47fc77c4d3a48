"""Sampling throughput side by side: the path issue 24 found (``baseline``) against the workbench's sampler
(``sampler``: ``decoding.decode`` from an inference copy), on three workloads, each side in a fresh process,
alternating rounds, with this machine's own limits measured in the same run.

    python benchmarks/bench_sampling.py [--rounds 2] [--prompts 32] [--samples 2] [--new-tokens 32]
                                        [--max-prompt-length 192] [--gold-prompts 16] [--gold-samples 6]
                                        [--workers 1]

``--workers 2``: both sides as two processes of one thread each, every other prompt, at once (how the evaluation and
the gold dataset use two cores); batch-1 stays one process.

Workloads (the embedded SmolLM2-135M in NF4 4-bit, bf16 compute where the CPU has it, a policy and a reference
adapter, both non-zero):

- ``eval``: the main grid's evaluation of one policy: ``--prompts`` held-out prompts x ``--samples`` samples of
  <= ``--new-tokens`` tokens (prompts cut to their last ``--max-prompt-length`` tokens), each sample with its per-token
  log pi and log pi_ref. baseline: ``model.generate`` on the 4-bit model in batches of 16 samples by prompt length,
  then log pi and log pi_ref each by a pass of every prompt with its samples. sampler: ``sample_completions`` as the
  evaluation calls it (an exact inference copy samples and gives log pi; one reference pass).
- ``gold``: the gold-labelled dataset's sampling: ``--gold-prompts`` prompts x ``--gold-samples`` replies, no
  log-probs, from the bf16 merged copy. baseline: ``model.generate`` on that copy, 64 samples a batch by prompt length.
- ``batch-1``: one prompt, one sample of ``--new-tokens`` tokens (an interactive look): baseline ``model.generate``
  on the 4-bit model; sampler: ``decode`` from the exact copy.

Throughput is sampled response tokens per second of wall clock (making the copy and the log-prob passes included).
The roofline of a workload is the larger of its FLOPs at this machine's bf16 matmul peak (2·N per token forwarded:
every prompt token once per model that must read it, every sampled token once per model) and the weight bytes read
at the measured memory bandwidth (one read of the bf16 weights per decoding step and model); the share reached is
roofline time / measured time. Below each workload: where the sampler's time goes (making the inference copy, the
prefill, the decoding steps and the time per step, the reference's pass over the samples, the rest).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _policy(models, dtype="auto"):
    import torch

    mcfg = models.ModelConfig(model_name_or_path=models.EMBEDDED_POLICY, load_in_4bit=True, dtype=dtype)
    torch.manual_seed(0)  # the adapters' initial A matrices: the same model in every process
    model, tok = models.load_policy(mcfg, trainable=False)
    model.add_adapter("ref", model.peft_config["default"])  # the reference is an adapter, as an SFT run's is
    model.set_adapter("default")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # both adapters non-zero, so policy and reference differ as trained ones do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval(), tok


def _baseline_samples(model, tok, prompt_ids, n_samples, new_tokens, batch_size, logprobs):
    """The sampling loop as issue 24 found it: ``model.generate`` per batch of samples in order of prompt length,
    the batch seeded as a whole, then log pi and log pi_ref by one pass each."""
    import torch

    from workbench.modeling import sampling
    from workbench.modeling.logprobs import pad_left, reference_adapter

    jobs = [i for i in range(len(prompt_ids)) for _ in range(n_samples)]
    order = sorted(range(len(jobs)), key=lambda j: len(prompt_ids[jobs[j]]))
    tokens = 0
    for start in range(0, len(order), batch_size):
        rows = [jobs[j] for j in order[start : start + batch_size]]
        ids, attn = pad_left([prompt_ids[i] for i in rows], tok.pad_token_id)
        torch.manual_seed(start)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=0.7, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=1,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        response, mask, _ = sampling.cut_after_eos(out[:, ids.shape[1]:], tok.eos_token_id, tok.pad_token_id)
        tokens += int(mask.sum())
        if logprobs:
            groups: dict[int, list[int]] = {}
            for k, i in enumerate(rows):
                groups.setdefault(i, []).append(k)
            P = [prompt_ids[i] for i in rows]
            sampling.sample_logps(model, P, response, mask, list(groups.values()), tok.pad_token_id, 0.7)
            with reference_adapter(model):
                sampling.sample_logps(model, P, response, mask, list(groups.values()), tok.pad_token_id, 0.7)
    return tokens


def _profiled(sampling, decoding) -> dict:
    """Wall seconds of the sampler side's phases: making copies, prefill, decoding steps, the reference pass (wrappers
    around the functions ``sample_completions`` calls; nothing else changes)."""
    phases = {"copy": 0.0, "prefill": 0.0, "decode steps": 0.0, "decode steps (n)": 0, "reference pass": 0.0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            phases[key] += time.perf_counter() - t
            return out
        return wrapper

    def decode(*a, **kw):
        got = real_decode(*a, **kw)
        phases["prefill"] += got.seconds["prefill"]
        phases["decode steps"] += got.seconds["steps"]
        phases["decode steps (n)"] += got.seconds["n_steps"]
        return got

    real_decode = decoding.decode
    sampling.decode = decode
    sampling.sample_logps = timed(sampling.sample_logps, "reference pass")
    sampling.inference_copy = timed(sampling.inference_copy, "copy")
    return phases


def child(args) -> dict:
    import torch

    from workbench.modeling import data, decoding, models, sampling
    from workbench.measurement import evaluate

    phases = _profiled(sampling, decoding) if args.setting == "sampler" else {}
    if args.workers > 1:  # one of several processes sharing the cores, as the evaluation's workers do
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))

    model, tok = _policy(models)
    prompts, _, _ = evaluate.eval_set(data.DataConfig(split="test"), max(args.prompts, args.gold_prompts), 0)
    prompts = prompts[args.worker :: args.workers]  # this worker's share, every W-th prompt
    base = args.setting == "baseline"
    start = time.time()
    if args.workload in ("eval", "gold"):
        gold = args.workload == "gold"
        n_prompts, k = (args.gold_prompts, args.gold_samples) if gold else (args.prompts, args.samples)
        prompts = prompts[: -(-n_prompts // args.workers)]
        # the gold dataset samples texts from the merged bf16 copy; the evaluation from the 4-bit model (baseline) or
        # its exact copy (sampler), with log pi and log pi_ref
        source = sampling.inference_copy(model, dtype=models.compute_dtype("auto")) if gold else model
        if base:
            ids = sampling.encode_prompts(tok, [p["prompt"] for p in prompts], args.max_prompt_length)
            tokens = _baseline_samples(source, tok, ids, k, args.new_tokens, 64 if gold else 16, not gold)
        else:
            recs = sampling.sample_completions(source, tok, prompts, n_samples=k, max_new_tokens=args.new_tokens,
                                               max_prompt_length=args.max_prompt_length, temperature=0.7,
                                               logprobs=not gold,
                                               sampler=None if gold else sampling.inference_copy(model))
            tokens = sum(r["response_tokens"] for r in recs)
        n = len(prompts)
    else:  # batch-1
        prompts = prompts[:1]
        ids = sampling.encode_prompts(tok, [p["prompt"] for p in prompts], args.max_prompt_length)
        if base:
            tokens = _baseline_samples(model, tok, ids, 1, args.new_tokens, 1, False)
        else:
            got = sampling.decode(sampling.inference_copy(model), ids, max_new_tokens=args.new_tokens, temperature=0.7,
                                  seeds=[0], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            tokens = int(got.mask.sum())
        k, n = 1, 1
    end = time.time()
    prompt_tokens = sum(len(x) for x in sampling.encode_prompts(tok, [p["prompt"] for p in prompts], args.max_prompt_length))
    from workbench.core import compute

    return {"start": start, "end": end, "tokens": tokens, "phases": phases, "prompt_tokens": prompt_tokens, "k": k, "n": n,
            "params": compute.matmul_params(model), "threads": torch.get_num_threads(),
            "dtype": str(models.compute_dtype("auto")), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(workload: str, setting: str, argv: list[str], workers: int = 1) -> dict:
    """One side of one workload: ``workers`` child processes at once, each on its share of the prompts (with
    ``workers`` > 1, tokens and memory summed, wall time from the first start to the last end, phases averaged)."""
    env = dict(os.environ, TQDM_DISABLE="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--workload", workload, "--setting", setting,
                               *argv, "--workers", str(workers), "--worker", str(w)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in range(workers)]
    outs = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{workload}/{setting}: a child process failed (exit {p.returncode}):\n{err[-3000:]}")
        outs.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    got = dict(outs[0])
    for key in ("tokens", "prompt_tokens", "peak_rss_gb"):
        got[key] = sum(o[key] for o in outs)
    got["start"], got["end"] = min(o["start"] for o in outs), max(o["end"] for o in outs)
    got["phases"] = {k: statistics.mean(o["phases"][k] for o in outs) for k in outs[0]["phases"]}
    got["wall_s"] = got["end"] - got["start"]
    got["tokens_per_s"] = got["tokens"] / got["wall_s"]
    return got


def limits() -> tuple[float, float]:
    """This machine's bf16 matmul peak (FLOP/s) and memory bandwidth (bytes/s: read + write of a 512 MB copy)."""
    import torch

    from workbench.core import compute

    peak = compute.peak_matmul_flops(torch.bfloat16)
    x = torch.empty(2**27)
    y = torch.empty_like(x)
    y.copy_(x)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    return peak, 2 * x.numel() * 4 * 5 / (time.perf_counter() - t)


def roofline_s(r: dict, workload: str, peak: float, bandwidth: float, new_tokens: int) -> float:
    """The workload's least time: the necessary FLOPs at the matmul peak or the weight reads at the bandwidth."""
    models_ = 2 if workload == "eval" else 1  # policy and reference read every prompt and every sampled token
    flops = 2 * r["params"] * models_ * (r["prompt_tokens"] + r["tokens"])
    reads = 2 * r["params"] * new_tokens * models_  # bf16 weights, once per decoding step
    return max(flops / peak, reads / bandwidth)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-length", type=int, default=192)
    ap.add_argument("--gold-prompts", type=int, default=16)
    ap.add_argument("--gold-samples", type=int, default=6)
    ap.add_argument("--workloads", default="eval,gold,batch-1")
    ap.add_argument("--workers", type=int, default=1, help="processes sharing the cores (the evaluation runs 2)")
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="eval", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="sampler", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    from workbench.modeling import models

    argv = [a for a in sys.argv[1:]]
    peak, bandwidth = limits()
    print(f"{models.native_bf16()[1]}, {os.cpu_count()} cores; bf16 matmul peak {peak / 1e9:.0f} GFLOP/s, memory "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s (copy, read + write), measured now")
    results = {}
    for r in range(args.rounds):
        for workload in args.workloads.split(","):
            for setting in ("baseline", "sampler"):
                res = run(workload, setting, argv, 1 if workload == "batch-1" else args.workers)
                results.setdefault((workload, setting), []).append(res)
                print(f"round {r} {workload:>8} {setting:>8}: {res['tokens']} tokens in {res['wall_s']:.1f} s = "
                      f"{res['tokens_per_s']:.1f} tokens/s ({res['dtype']}, {res['threads']} threads x "
                      f"{1 if workload == 'batch-1' else args.workers} processes, peak RSS "
                      f"{res['peak_rss_gb']:.1f} GiB)", flush=True)
    for workload in args.workloads.split(","):
        b, s = (results[(workload, x)] for x in ("baseline", "sampler"))
        tb, ts = (statistics.mean(x["tokens_per_s"] for x in v) for v in (b, s))
        roof = statistics.mean(roofline_s(x, workload, peak, bandwidth, args.new_tokens) for x in s)
        print(f"{workload}: baseline {tb:.1f} tokens/s, sampler {ts:.1f} tokens/s ({ts / tb:.2f}x), mean of "
              f"{args.rounds} rounds; the sampler reaches {100 * roof / statistics.mean(x['wall_s'] for x in s):.0f} % "
              f"of the roofline ({roof:.1f} s); peak RSS {max(x['peak_rss_gb'] for x in s):.1f} GiB")
        wall = statistics.mean(x["wall_s"] for x in s)
        ph = {k: statistics.mean(x["phases"].get(k, 0) for x in s) for k in s[0]["phases"]}
        steps = ph.pop("decode steps (n)", 0)
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in ph.items() if v)
        per_step = f"; {1e3 * ph['decode steps'] / steps:.0f} ms a decoding step" if steps else ""
        print(f"  where the sampler's {wall:.1f} s go: {parts}, the rest {wall - sum(ph.values()):.1f} s (rewards, "
              f"tokenizing, records){per_step}")


if __name__ == "__main__":
    main()
