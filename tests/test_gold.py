"""The known-gold study: the gold reward (VADER), gold-labelled datasets (sampled once, read by every arm, refused
when built from another policy or gold), snapshots for the frontier, best-of-n against a proxy, and the evaluation's
paired differences and budgets; on the tiny model, end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.modeling import data, models, rewards, sampling
from workbench.training import gold_pairs, train
from workbench.reporting import paper, widgets
from workbench.measurement import results
from workbench.core import stats
from workbench.orchestration import sweep
from workbench.modeling.runs import is_complete, load_run, read_jsonl


# ----------------------------------------------------------------------------------------------------------
# The gold reward


def test_the_vader_gold_scores_fixed_strings_as_vadersentiment_does():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["Great!", " ".join(["great"] * 10), "I cannot help with that.", "This is awful, I hate it.", "",
             "Sure, here is how to do it.", "I'm NOT happy :("]
    expected = [SentimentIntensityAnalyzer().polarity_scores(t) for t in texts]
    compound, posneg = rewards.load_reward("vader"), rewards.load_reward("vader:posneg")
    np.testing.assert_allclose(compound.score([None] * len(texts), texts).numpy(), [e["compound"] for e in expected],
                               atol=1e-6)
    np.testing.assert_allclose(posneg.score([None] * len(texts), texts).numpy(), [e["pos"] - e["neg"] for e in expected],
                               atol=1e-6)
    assert compound(prompts=None, completions=[[{"role": "assistant", "content": "Great!"}]]) == pytest.approx([0.6588])
    # what the docs say of it: a one-word hack scores pos − neg 1.0, ten of them a compound of 0.99
    assert posneg.score([None], ["Great!"]).item() == 1.0 and compound.score([None], ["great " * 10]).item() > 0.99
    assert rewards.load_reward("vader:compound").variant == "compound"


def test_an_unknown_gold_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown reward 'vadr' \(did you mean 'vader'\?\).*vader:posneg.*judge"):
        rewards.load_reward("vadr")
    with pytest.raises(ValueError, match="variant"):
        rewards.VaderReward("neutral")


def test_a_gold_that_returns_nan_names_the_sample():
    class Broken:
        __name__ = "broken-gold"

        def __call__(self, prompts=None, completions=None, **_):
            return [0.5, float("nan"), 0.1]

        def score(self, prompts, completions):
            return torch.tensor([0.5, float("nan"), 0.1])

    ids = torch.zeros((3, 2), dtype=torch.long)
    with pytest.raises(ValueError, match=r"'broken-gold' returned nan for sample 1 of 3.*'second'"):
        sampling.call_reward(Broken(), [None] * 3, ["first", "second", "third"], ids, ids.bool())
    with pytest.raises(ValueError, match="sample 1"):
        rewards.score_replies(Broken(), [None] * 3, ["first", "second", "third"], ["x"] * 3)


# ----------------------------------------------------------------------------------------------------------
# A gold-labelled dataset on the tiny model


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_peaked(tmp_path_factory, smollm_tokenizer):
    """A tiny random model with a peaked next-token distribution (it says words VADER knows now and then)."""
    return models.save_tiny_causal_lm(smollm_tokenizer, tmp_path_factory.mktemp("tiny-peaked"), seed=0, init_std=0.3)


@pytest.fixture(scope="module")
def study(tiny_peaked, hh_dir, tmp_path_factory):
    """grids/ci-gold.yaml on the tiny model, through the notebooks: SFT -> a gold-labelled dataset -> its relabelling
    with noise -> a proxy on its half "a" -> DPO with snapshots on its half "b" -> PPO against the proxy and against
    the gold -> the evaluation (snapshots, best-of-n) -> the inspector."""
    import os

    cwd = tmp_path_factory.mktemp("gold-sweep")
    runs = cwd / "runs" / "ci-gold"
    overrides = {"model": str(tiny_peaked), "data_source": str(hh_dir)}
    old = os.getcwd()
    os.chdir(cwd)  # the grid's relative figures_dir resolves here
    try:
        result = sweep.run_sweep(REPO / "grids" / "ci-gold.yaml", overrides, runs_dir=str(runs))
    finally:
        os.chdir(old)
    assert not result.failed, result.report()
    done = {p.name.split("__")[0] + "/" + p.name.split("__")[1]: p for p in runs.iterdir() if is_complete(p)}
    common = dict(model=str(tiny_peaked), data_source=str(hh_dir), split="test", runs_dir=str(runs))
    return {"runs": runs, "result": result, "sft": done["sft/default"], "dataset": done["gold-pairs/default"],
            "noisy": done["gold-pairs/noisy"], "proxy": done["reward/proxy"], "dpo": done["dpo/default"],
            "ppo": {"proxy": done["ppo/default"], "gt": done["ppo/gt"]}, "common": common, "cwd": cwd,
            "sizes": dict(n_proxy_prompts=8, n_policy_prompts=8, n_eval_prompts=4, max_new_tokens=12)}


def test_the_dataset_splits_prompts_three_ways_and_accounts_for_every_pair(study, hh_dir):
    folder = study["dataset"]
    samples, pairs = read_jsonl(folder / "records" / "samples.jsonl"), read_jsonl(folder / "pairs.jsonl")
    summary = json.loads((folder / "summary.json").read_text())
    prompts = {part: {s["id"] for s in samples if s["part"] == part} for part in gold_pairs.PARTS}
    assert [len(prompts[p]) for p in gold_pairs.PARTS] == [8, 8, 4]
    assert not (prompts["proxy"] & prompts["policy"]) and not (prompts["eval"] & (prompts["proxy"] | prompts["policy"]))
    # the parts are the data layer's own split and halves, so the arms' usual knobs read them
    hh, _ = data.load_hh("harmless-base", "test", hh_dir)
    train_side, heldout, _ = data.split_heldout(hh, 0.1, seed=0)
    assert prompts["eval"] <= {p["id"] for p in data.prompt_view(heldout)}
    assert prompts["proxy"] <= {p["id"] for p in data.prompt_view(data.half(train_side, "a"))}
    assert prompts["policy"] <= {p["id"] for p in data.prompt_view(data.half(train_side, "b"))}
    tok = models.load_tokenizer(study["common"]["model"])
    assert all(len(x) <= 96 for x in sampling.encode_prompts(tok, [s["prompt"] for s in samples], 10**6)), "never cut"
    gold = rewards.load_reward("vader")
    assert [s["gold"] for s in samples] == pytest.approx(gold.score(None, [s["completion"] for s in samples]).tolist())
    for part in gold_pairs.PARTS:  # every candidate pair is a pair or a counted tie
        c = summary["counts"][part]
        k = 8 if part == "eval" else 4
        assert c["candidate_pairs"] == c["prompts"] * (k // 2 if part == "eval" else k * (k - 1) // 2)
        assert c["pairs"] + c["ties_dropped"] == c["candidate_pairs"]
        assert c["pairs"] == sum(p["part"] == part for p in pairs)
    assert all(p["chosen_gold"] > p["rejected_gold"] for p in pairs), "deterministic labels: the higher gold wins"
    ties = [p for p in pairs if p["chosen_gold"] == p["rejected_gold"]]
    assert not ties
    evals = [p for p in pairs if p["part"] == "eval"]  # held-out pairs share no reply
    used = [(p["id"].split("#")[0], s) for p in evals for s in (p["chosen_sample"], p["rejected_sample"])]
    assert len(used) == len(set(used))
    read, report = data.read_pairs(folder / "pairs.jsonl")  # readable as any pairs file, in the data layer's format
    assert len(read) == len(pairs) and report.kept == report.read


def test_relabelling_reuses_the_samples_and_flips_the_stated_share(study):
    clean, noisy = study["dataset"], study["noisy"]
    assert read_jsonl(clean / "records" / "samples.jsonl") == read_jsonl(noisy / "records" / "samples.jsonl")
    summary = json.loads((noisy / "summary.json").read_text())
    assert summary["time/sampling_s"] == 0 and summary["counts"]["proxy"]["samples"] == 32
    pairs = read_jsonl(noisy / "pairs.jsonl")
    flipped = [p for p in pairs if p["flipped"]]
    assert sum(c["flipped"] for c in summary["counts"].values()) == len(flipped) > 0
    assert all(p["chosen_gold"] < p["rejected_gold"] for p in flipped)
    assert all(p["chosen_gold"] > p["rejected_gold"] for p in pairs if not p["flipped"])
    assert Path(gold_pairs.recipe(noisy)["reuse_samples"]).resolve() == clean.resolve() and gold_pairs.recipe(noisy)["label_noise"] == 0.5


def test_arms_naming_the_dataset_read_it_and_never_resample(study):
    folder = study["dataset"]
    runs = [p for p in study["runs"].iterdir() if is_complete(p) and p.name.startswith("gold-pairs__")]
    assert sorted(runs) == sorted([folder, study["noisy"]]), "one dataset and its relabelling, nothing sampled again"
    pairs = {p["id"]: p for p in read_jsonl(folder / "pairs.jsonl")}
    proxy_ids = json.loads((study["proxy"] / "split.json").read_text())["train_ids"]
    dpo_ids = json.loads((study["dpo"] / "split.json").read_text())["train_ids"]
    assert proxy_ids and {pairs[i]["part"] for i in proxy_ids} == {"proxy"}
    assert dpo_ids and {pairs[i]["part"] for i in dpo_ids} == {"policy"}
    assert load_run(study["dpo"]).summary["train/pairs"] == len(dpo_ids) == sum(
        p["part"] == "policy" for p in pairs.values())


def test_a_dataset_of_another_policy_or_gold_is_refused_with_both_recipes(study, tiny_peaked):
    common = study["common"]
    _, other = train.make_config("sft", max_steps=1, per_device_train_batch_size=2, max_length=160, n_train=4, n_score=2,
                                 run_name="other", **common)
    other_sft = train.train("sft", other)
    _, cfg = train.make_config("dpo", sft_run=str(other_sft), half="b", max_steps=1, per_device_train_batch_size=2,
                               max_length=160, **{**common, "data_source": str(study["dataset"])})
    with pytest.raises(ValueError, match=r"(?s)another policy.*dataset recipe:.*sft__default.*expects:.*sft__other"):
        train.train("dpo", cfg)
    _, cfg = train.make_config("ppo", sft_run=str(study["sft"]), half="b", max_steps=1, reward_model="vader",
                               gold_reward_model="vader:posneg", **{**common, "data_source": str(study["dataset"])})
    with pytest.raises(ValueError, match=r"(?s)another gold.*\"gold\": \"vader\".*\"gold\": \"vader:posneg\""):
        train.train("ppo", cfg)
    with pytest.raises(ValueError, match="other settings"):  # relabelling needs the very same samples
        _, cfg = train.make_config("gold-pairs", sft_run=str(study["sft"]), reuse_samples=str(study["dataset"]),
                                   run_name="bad", **{**study["sizes"], "n_eval_prompts": 2}, **common)
        train.train("gold-pairs", cfg)


def test_bad_lines_of_a_pairs_file_name_the_line_and_field(tmp_path):
    good = {"id": "a", "prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "y"}]}
    cases = {
        "not json": ("{oops", "line 2, field '<json>'"),
        "missing": ({k: v for k, v in good.items() if k != "rejected"}, "field 'rejected': missing"),
        "empty": ({**good, "chosen": [{"role": "assistant", "content": " "}]}, "field 'chosen': is empty"),
        "same": ({**good, "rejected": good["chosen"]}, "same text as chosen"),
        "turns": ({**good, "prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                  "turn 1 has role 'user', expected 'assistant'"),
    }
    for name, (row, needle) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(good) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
        with pytest.raises(data.HHFormatError, match="line 2") as e:
            data.read_pairs(path)
        assert needle in str(e.value) and str(path) in str(e.value), name


def test_snapshots_are_saved_and_evaluated_for_the_frontier(study):
    snaps = sorted(p.name for p in (study["dpo"] / "checkpoints").iterdir())
    assert snaps == ["step-1", "step-2"]
    assert sorted(p.name for p in (study["ppo"]["gt"] / "checkpoints").iterdir()) == ["step-1", "step-2"]


@pytest.fixture(scope="module")
def evaluated(study):
    """The sweep's evaluation: its run folders and results table."""
    table = study["result"].table
    return [Path(p) for p in table["path"]], table


def test_the_evaluation_measures_every_policy_and_snapshot_by_the_gold(study, evaluated):
    paths, table = evaluated
    assert not [p for p in paths if p.name.startswith("gold-pairs__")], "a dataset is not evaluated"
    pol = table[table["method"] != "reward"]
    assert pol["eval/gold"].notna().all() and pol["eval/distinct2"].between(0, 1).all()
    arms = pol[pol["method"] != "sft"]
    assert arms["eval/gold_vs_sft"].notna().all()
    for _, r in arms.iterrows():  # the paired difference is the mean of the per-(prompt, sample) differences
        mine = {(g["id"], g["sample"]): g["gold_score"] for g in read_jsonl(Path(r["path"]) / "eval/default/generations.jsonl")}
        sft = {(g["id"], g["sample"]): g["gold_score"] for g in read_jsonl(study["sft"] / "eval/default/generations.jsonl")}
        assert r["eval/gold_vs_sft"] == pytest.approx(np.mean([mine[k] - sft[k] for k in mine]))
        assert r["eval/gold_vs_sft_lo"] <= r["eval/gold_vs_sft"] <= r["eval/gold_vs_sft_hi"]
    snaps = results.snapshot_table(paths)
    dpo = snaps[snaps["method"] == "dpo"]
    assert dpo["step"].tolist() == [1, 2, 3] and dpo["final"].tolist() == [False, False, True]
    assert dpo["eval/kl"].notna().all() and dpo["eval/gold"].notna().all()
    step1 = read_jsonl(study["dpo"] / "eval/default/steps/step-1/generations.jsonl")  # the grid's snapshot share
    final_ids = {g["id"] for g in read_jsonl(study["dpo"] / "eval/default/generations.jsonl")}
    assert len(step1) == 2 and {g["sample"] for g in step1} == {0} and len({g["id"] for g in step1}) == 2
    assert {g["id"] for g in step1} < final_ids, "a snapshot is evaluated on a share of the final's prompts"
    assert snaps[snaps["method"] == "sft"]["eval/kl"].tolist() == [0.0]
    gens = read_jsonl(study["dpo"] / "eval/default/generations.jsonl")  # the inspector's columns
    beta = load_run(study["dpo"]).config["beta"]
    assert all(g["implicit_reward"] == pytest.approx(beta * g["kl"]) for g in gens)


def test_budgets_count_gold_labels_and_generated_tokens(study, evaluated):
    _, table = evaluated
    row = {(r["method"], r["name"]): r for _, r in table.iterrows()}
    pairs = read_jsonl(study["dataset"] / "pairs.jsonl")
    counts = json.loads((study["dataset"] / "summary.json").read_text())["counts"]
    assert row[("dpo", "default")]["budget/gold_pairs"] == sum(p["part"] == "policy" for p in pairs)
    assert row[("dpo", "default")]["budget/tokens_generated"] == counts["policy"]["tokens_generated"]
    assert row[("ppo", "default")]["budget/gold_pairs"] == sum(p["part"] == "proxy" for p in pairs)  # through its proxy
    assert row[("ppo", "default")]["budget/gold_queries"] == 0
    assert row[("ppo", "gt")]["budget/gold_queries"] == 3 * 4 and row[("ppo", "gt")]["budget/gold_pairs"] == 0
    own = json.loads((study["ppo"]["gt"] / "compute.json").read_text())["tokens"]["generated"]
    assert row[("ppo", "gt")]["budget/tokens_generated"] == own > 0


def test_best_of_n_is_drawn_against_the_proxy_from_the_held_out_samples(study, evaluated):
    rows = read_jsonl(study["proxy"] / "eval/default/best_of_n.jsonl")
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    assert rows[0]["gold_gain"] == 0 and rows[0]["proxy_gain"] == 0 and rows[0]["kl_bound"] == 0
    assert all(b["proxy"] >= a["proxy"] - 1e-9 for a, b in zip(rows, rows[1:])), "best-of-n by the proxy raises it"
    assert all(r["kl_plugin"] <= r["kl_bound"] + 1e-9 for r in rows)
    # by hand: the proxy's scores of the held-out samples, the estimator, averaged over prompts
    samples = gold_pairs.parts_of(study["dataset"])["eval"]
    proxy = rewards.load_reward(str(study["proxy"]))
    scores = proxy.score([s["prompt"] for s in samples], [s["completion"] for s in samples]).numpy()
    by = {}
    for s, p in zip(samples, scores):
        by.setdefault(s["id"], []).append((p, s["gold"]))
    est = np.mean([stats.best_of_n_expectation([p for p, _ in v], [g for _, g in v], [8])[0] for v in by.values()])
    assert rows[-1]["gold"] == pytest.approx(est, abs=1e-6)
    summary = json.loads((study["proxy"] / "eval/default/summary.json").read_text())  # the figure's unit
    assert summary["bon/proxy_sd"] == pytest.approx(np.std(scores, ddof=1), rel=1e-5)
    assert summary["bon/gold_sd"] == pytest.approx(np.std([s["gold"] for s in samples], ddof=1), rel=1e-9)


def test_the_inference_copy_computes_as_the_policy_does(tiny_model_dir):
    model, tok = models.load_policy(models.ModelConfig(model_name_or_path=str(tiny_model_dir)), trainable=False)
    model.eval()  # dropout off, as whenever a policy samples
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    x = torch.tensor([tok.encode("How do I bake bread without an oven?")])
    copy = sampling.inference_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=x).logits.float(), model(input_ids=x).logits.float(), atol=1e-4, rtol=0)
        base = sampling.inference_copy(model, adapter=None)
        with model.disable_adapter():
            torch.testing.assert_close(base(input_ids=x).logits.float(), model(input_ids=x).logits.float(), atol=1e-4,
                                       rtol=0)
    assert not [m for m in copy.modules() if type(m).__module__.startswith(("peft", "bitsandbytes"))]
    merged = sampling.inference_copy(model, dtype=torch.float32)  # the fast form: the update merged into the weights
    with torch.no_grad():  # in float32 it is the same function up to the order of sums
        torch.testing.assert_close(merged(input_ids=x).logits.float(), model(input_ids=x).logits.float(), atol=1e-4,
                                   rtol=0)
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_the_inspector_sorts_samples_by_proxy_minus_gold(study, evaluated):
    model = widgets.InspectorModel(study["runs"])
    gens = model.generations
    assert {"gold_score", "score", "implicit_reward", "proxy_minus_gold"} <= set(gens)
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    np.testing.assert_allclose(gens["proxy_minus_gold"], z(gens["score"]) - z(gens["gold_score"]), atol=1e-9)
    top = model.rows("generations", filter_name="proxy far above gold (top 10%)", sort="proxy_minus_gold")
    assert len(top) and top["proxy_minus_gold"].is_monotonic_decreasing
    assert top["proxy_minus_gold"].min() >= gens["proxy_minus_gold"].quantile(0.9) - 1e-12


def test_the_sweep_ends_with_the_frontier_the_overoptimisation_figure_and_a_draft_of_the_gold_study(study, tmp_path):
    table = study["result"].table
    figs = {p.name for p in (study["cwd"] / "runs" / "ci-gold" / "figures").iterdir()}
    assert {f"{n}.{ext}" for n in ("frontier", "overoptimization") for ext in ("pdf", "svg", "png")} <= figs
    draft = paper.build(table, tmp_path / "draft.md", study["cwd"] / "runs" / "ci-gold" / "figures").read_text()
    assert "{{" not in draft and "known gold" in draft.lower()
    for needle in ("gold − SFT (paired)", "Table 2", "best-of-n against", "held-out accuracy", "seeds 0"):
        assert needle in draft, needle
    frontier = __import__("workbench.reporting.figures", fromlist=["fig_frontier"]).fig_frontier(table)
    names = {t.name for t in frontier.data if t.name}
    assert any(n.startswith("ppo (gt)") for n in names) and any(n.startswith("best-of-n") for n in names)
    assert any(n.startswith("dpo") for n in names)
    over = __import__("workbench.reporting.figures", fromlist=["x"]).fig_overoptimization(table)
    names = {t.name for t in over.data if t.name}
    assert {"PPO against the proxy, seed 0", "PPO against the gold, seed 0", "proxy, PPO against the proxy, seed 0"} <= names
    assert any(n.startswith("best-of-n vs proxy") for n in names)
    # one legend entry per run or proxy (its proxy curve, dashed, toggles with it), each run its own colour
    shown = [t for t in over.data if t.showlegend is not False]
    assert all(not t.name.startswith("proxy, ") for t in shown)
    ppo_colours = [t.line.color for t in shown if t.name.startswith("PPO against")]
    assert len(ppo_colours) == len(set(ppo_colours))
