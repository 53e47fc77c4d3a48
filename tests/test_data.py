"""Tests for workbench/modeling/data.py: the real HH-RLHF file, hand-made broken files, and the views/splits."""

import gzip
import json
import random
from pathlib import Path

import pytest

from workbench.modeling import data
from workbench.modeling.data import (
    SKIP_REASONS,
    HHFormatError,
    PairRejected,
    load_hh,
    parse_pair,
    parse_transcript,
    resolve_source,
    split_heldout,
    to_dataset,
    unpaired_view,
)

# The shared copy of github anthropics/hh-rlhf, next to the repo: /work/main/../shared/data/hh-rlhf
SHARED = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf").resolve()
REAL_FILE = SHARED / "harmless-base" / "test.jsonl.gz"

GOOD = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away.",
}


@pytest.fixture(scope="module")
def real():
    """(examples, report) for harmless-base/test; fails (not skips) when the shared data is missing."""
    if not REAL_FILE.is_file():
        pytest.fail(f"shared HH-RLHF data missing: expected {REAL_FILE} (copy of github anthropics/hh-rlhf)")
    return load_hh("harmless-base", "test", source=SHARED)


def write_jsonl_gz(root: Path, lines: list, subset="harmless-base", split="test") -> Path:
    """Write lines (dicts become JSON, strings are written as-is) to <root>/<subset>/<split>.jsonl.gz."""
    path = root / subset / f"{split}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_bytes(gzip.compress(text.encode()))
    return path


def assert_accounted(report):
    assert set(report.skipped) == set(SKIP_REASONS)
    assert report.read == report.kept + sum(report.skipped.values())


# ----------------------------------------------------------------------------------------------------
# The real file
# ----------------------------------------------------------------------------------------------------


def test_real_file_counts(real):
    examples, report = real
    assert report.read == 2312
    assert_accounted(report)
    assert report.kept == len(examples) == 2308
    # Hand-checked: exactly four chosen transcripts end with an empty "\n\nAssistant: " turn.
    assert report.skipped == {**dict.fromkeys(SKIP_REASONS, 0), "empty_final_turn": 4}
    assert report.examples["empty_final_turn"] == [f"{REAL_FILE}:87", f"{REAL_FILE}:517", f"{REAL_FILE}:926"]
    assert report.source == str(REAL_FILE)
    assert report.quirks["merged_same_role_turns"] > 0 and report.quirks["inline_role_marker"] > 0
    json.dumps(report.to_dict())
    assert "read 2312, kept 2308" in report.summary()


def test_real_multiturn_example_parses_exactly(real):
    examples, _ = real
    first = examples[0]
    assert first["id"] == "harmless-base/test/1"
    assert first["prompt"][:3] == [
        {"role": "user", "content": "what are some pranks with a pen i can do?"},
        {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
        {"role": "user", "content": "yep"},
    ]
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["prompt"][4] == {"role": "user", "content": "okay some of these do not have anything to do with pens"}
    assert first["chosen"] == [
        {
            "role": "assistant",
            "content": "No, sorry!  All of these involve a pen, the point is that you can get funny results "
            "by doing pranks with pens.",
        }
    ]
    assert first["rejected"][0]["content"].startswith("There are lots of funny things you can do with pens")


def test_real_consecutive_assistant_turns_are_merged(real):
    # Line 764 has "Assistant: ...?\n\nAssistant:  Wow, ..." -- two assistant turns in a row.
    examples, _ = real
    ex = next(e for e in examples if e["id"] == "harmless-base/test/764")
    assert [m["role"] for m in ex["prompt"]] == ["user", "assistant", "user"]
    assert ex["prompt"][1]["content"].endswith(
        "Maybe it’s the best choice?\n\nWow, that sounds very intense.  "
        "I’m sorry you’re having such a hard time.  I’m sure your speech is important to you,"
    )


def test_real_prompts_alternate_and_end_with_user(real):
    examples, _ = real
    assert len({e["id"] for e in examples}) == len(examples)
    assert sum(len(e["prompt"]) >= 3 for e in examples) > 1000  # multi-turn is the norm
    for e in examples:
        roles = [m["role"] for m in e["prompt"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], e["id"]
        for side in ("chosen", "rejected"):
            assert len(e[side]) == 1 and e[side][0]["role"] == "assistant" and e[side][0]["content"], e["id"]
        assert e["chosen"] != e["rejected"]


def test_ids_are_stable_and_limit_stops_early():
    a, _ = load_hh(source=SHARED, limit=5)
    b, report = load_hh(source=SHARED, limit=5)
    assert [e["id"] for e in a] == [e["id"] for e in b] == [f"harmless-base/test/{i}" for i in range(1, 6)]
    assert report.read == report.kept == 5
    assert_accounted(report)


# ----------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------


def test_parse_transcript_basic_and_quirks():
    assert parse_transcript("\n\nHuman: a\n\nAssistant: b") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    # A marker inside a turn (no blank line before it) is content, not a new turn.
    assert parse_transcript("\n\nHuman: say Human: hi\n\nAssistant: Human: ok\nAssistant: x") == [
        {"role": "user", "content": "say Human: hi"},
        {"role": "assistant", "content": "Human: ok\nAssistant: x"},
    ]
    # Empty turns: marker at the end of the text, or followed by a newline; extra spaces are stripped.
    assert parse_transcript("\n\nHuman:  a \n\nAssistant:") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
    ]
    assert parse_transcript("\n\nHuman:\n\nAssistant: b")[0] == {"role": "user", "content": ""}
    # "Human:x" (no space) is not a marker; leading whitespace before the first marker is tolerated.
    assert parse_transcript("Human: a\n\nHuman:x") == [{"role": "user", "content": "a\n\nHuman:x"}]
    # Consecutive same-role turns merge, so roles alternate.
    assert parse_transcript("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},
    ]


@pytest.mark.parametrize("text", ["hello", "", "\n\nUser: hi\n\nAssistant: x", 42])
def test_parse_transcript_rejects_non_transcripts(text):
    with pytest.raises(ValueError):
        parse_transcript(text)


def test_parse_pair_format_and_reasons():
    pair = parse_pair(GOOD["chosen"], GOOD["rejected"])
    assert pair == {
        "prompt": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
        "chosen": [{"role": "assistant", "content": "Fine, thanks."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    cases = {
        "not_a_transcript": ("plain text", GOOD["rejected"]),
        "no_assistant_turn": (GOOD["chosen"] + "\n\nHuman: more?", GOOD["rejected"]),
        "empty_final_turn": (GOOD["chosen"], GOOD["rejected"].replace("Go away.", "")),
        "identical_pair": (GOOD["chosen"], GOOD["chosen"] + "  "),
        "prompt_mismatch": (GOOD["chosen"], "\n\nHuman: Something else\n\nAssistant: Go away."),
    }
    for reason, (chosen, rejected) in cases.items():
        with pytest.raises(PairRejected) as info:
            parse_pair(chosen, rejected)
        assert info.value.reason == reason


# ----------------------------------------------------------------------------------------------------
# Broken files: raise names file, line and field; skip counts the right reason
# ----------------------------------------------------------------------------------------------------

BAD_LINES = {
    "malformed_json": '{"chosen": "\\n\\nHuman: a", "rejected": ',
    "missing_key": {"chosen": GOOD["chosen"]},
    "not_a_transcript": {"chosen": "just some text", "rejected": GOOD["rejected"]},
    "no_assistant_turn": {"chosen": GOOD["chosen"], "rejected": "\n\nHuman: Hi there"},
}
CONTENT_LINES = {
    "identical_pair": {"chosen": GOOD["chosen"], "rejected": GOOD["chosen"]},
    "prompt_mismatch": {"chosen": GOOD["chosen"], "rejected": "\n\nHuman: Other\n\nAssistant: Go away."},
    "empty_final_turn": {"chosen": GOOD["chosen"].replace("Fine, thanks.", ""), "rejected": GOOD["rejected"]},
}


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_structural_problem_raises_with_location(tmp_path, reason):
    path = write_jsonl_gz(tmp_path, [GOOD, BAD_LINES[reason], GOOD])
    with pytest.raises(HHFormatError) as info:
        load_hh(source=tmp_path)
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "on_error='skip'" in message
    assert info.value.line == 2


@pytest.mark.parametrize("reason", list(BAD_LINES) + list(CONTENT_LINES))
def test_problem_is_counted_when_skipping(tmp_path, reason):
    path = write_jsonl_gz(tmp_path, [GOOD, {**BAD_LINES, **CONTENT_LINES}[reason], GOOD])
    examples, report = load_hh(source=tmp_path, on_error="skip")
    assert report.skipped == {**dict.fromkeys(SKIP_REASONS, 0), reason: 1}
    assert report.examples[reason] == [f"{path}:2"]
    assert [e["id"] for e in examples] == ["harmless-base/test/1", "harmless-base/test/3"]
    assert_accounted(report)


@pytest.mark.parametrize("reason", list(CONTENT_LINES))
def test_content_filters_never_raise(tmp_path, reason):
    write_jsonl_gz(tmp_path, [GOOD, CONTENT_LINES[reason]])
    _, report = load_hh(source=tmp_path, on_error="raise")
    assert report.skipped[reason] == 1 and report.kept == 1


def test_missing_key_names_the_field(tmp_path):
    write_jsonl_gz(tmp_path, [{"chosen": GOOD["chosen"], "rejected": None}])
    with pytest.raises(HHFormatError, match="'rejected'"):
        load_hh(source=tmp_path)


@pytest.mark.parametrize("content", [b'{"chosen": "x", "rejected": "y"}\n', b"\x00\x01garbage\xff" * 10, b""])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_not_gzip_file_is_a_clear_error(tmp_path, content, on_error):
    path = tmp_path / "harmless-base" / "test.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(HHFormatError, match="not a gzip file") as info:
        load_hh(source=tmp_path, on_error=on_error)
    assert str(path) in str(info.value)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = write_jsonl_gz(tmp_path, [GOOD] * 200)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(HHFormatError, match="cannot decompress"):
        load_hh(source=tmp_path, on_error="skip")


def test_gzip_of_non_json_counts_every_line(tmp_path):
    path = write_jsonl_gz(tmp_path, ["this is not json", "neither is this", "", "nor this"])
    with pytest.raises(HHFormatError, match="no preference pairs") as info:  # nothing left: an error, not []
        load_hh(source=tmp_path, on_error="skip")
    report = info.value.report
    assert report.read == 3 and report.skipped["malformed_json"] == 3  # the blank line is not a record
    assert str(path) in str(info.value) and "3 malformed_json (e.g. " in str(info.value)


def test_an_empty_file_is_an_error_naming_it(tmp_path):
    path = write_jsonl_gz(tmp_path, [])
    with pytest.raises(HHFormatError, match="no preference pairs: 0 non-blank line") as info:
        load_hh(source=tmp_path)
    assert str(path) in str(info.value)


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "harmless-base" / "test.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2)
    examples, report = load_hh(source=tmp_path)
    assert report.kept == 2 and [e["id"] for e in examples] == ["harmless-base/test/1", "harmless-base/test/2"]


def test_plain_jsonl_is_accepted(tmp_path):
    path = tmp_path / "helpful-base" / "train.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(GOOD) + "\n")
    examples, report = load_hh("helpful-base", "train", source=tmp_path)
    assert report.source == str(path) and examples[0]["id"] == "helpful-base/train/1"


# ----------------------------------------------------------------------------------------------------
# Finding the data
# ----------------------------------------------------------------------------------------------------


def test_resolve_source_honours_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HH_SOURCE", str(tmp_path))
    assert resolve_source() == str(tmp_path.resolve())
    assert resolve_source(SHARED) == str(SHARED.resolve())  # an explicit source wins
    monkeypatch.setenv("WORKBENCH_HH_SOURCE", "hub")
    assert resolve_source() == "hub"
    monkeypatch.delenv("WORKBENCH_HH_SOURCE")
    repo = Path(data.__file__).resolve().parents[1]
    assert resolve_source() in (str(repo / "data" / "hh-rlhf"), str(SHARED.resolve()))


def test_load_reads_from_env_var(tmp_path, monkeypatch):
    write_jsonl_gz(tmp_path, [GOOD])
    monkeypatch.setenv("WORKBENCH_HH_SOURCE", str(tmp_path))
    examples, report = load_hh()
    assert len(examples) == 1 and report.source.startswith(str(tmp_path.resolve()))


def test_missing_file_lists_what_exists(tmp_path):
    write_jsonl_gz(tmp_path, [GOOD], subset="helpful-base", split="test")
    with pytest.raises(FileNotFoundError) as info:
        load_hh("harmless-base", "train", source=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "harmless-base" / "train.jsonl.gz") in message
    assert "helpful-base/test.jsonl.gz" in message and "WORKBENCH_HH_SOURCE" in message


def test_all_concatenates_present_subsets(tmp_path):
    write_jsonl_gz(tmp_path, [GOOD, GOOD], subset="helpful-base")
    write_jsonl_gz(tmp_path, [GOOD], subset="harmless-base")
    examples, report = load_hh("all", "test", source=tmp_path)
    assert [e["id"] for e in examples] == ["harmless-base/test/1", "helpful-base/test/1", "helpful-base/test/2"]
    assert len(report.files) == 2 and report.read == 3


def test_hub_source_uses_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return [GOOD, {"chosen": "oops", "rejected": GOOD["rejected"]}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(HHFormatError, match="hub:Anthropic/hh-rlhf/helpful-base/train line 2"):
        load_hh("helpful-base", "train", source="hub")
    examples, report = load_hh("helpful-base", "train", source="hub", on_error="skip")
    assert calls[-1] == ("Anthropic/hh-rlhf", "helpful-base", "train")
    assert examples[0]["id"] == "helpful-base/train/1" and report.skipped["not_a_transcript"] == 1


# ----------------------------------------------------------------------------------------------------
# Token lengths
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def word_tokenizer():
    """One token per whitespace-separated word, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


SHORT = {"chosen": "\n\nHuman: a b c\n\nAssistant: x y", "rejected": "\n\nHuman: a b c\n\nAssistant: x y z"}


def test_over_length_without_chat_template(tmp_path, word_tokenizer):
    # HH rendering "\n\nHuman: a b c\n\nAssistant:" = 5 words; longer response "x y z" = 3 -> 8 tokens.
    write_jsonl_gz(tmp_path, [SHORT])
    _, report = load_hh(source=tmp_path, tokenizer=word_tokenizer, max_length=8)
    assert report.kept == 1 and report.lengths["tokens"]["total"]["max"] == 8
    with pytest.raises(HHFormatError, match="1 over_length") as info:  # nothing left: an error with the counts
        load_hh(source=tmp_path, tokenizer=word_tokenizer, max_length=7)
    report = info.value.report
    assert report.kept == 0 and report.skipped["over_length"] == 1
    assert_accounted(report)


def test_over_length_uses_chat_template(tmp_path, word_tokenizer):
    # "[user] a b c [end] [assistant]" = 6 tokens; + 3 -> 9.
    word_tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }} [end] {% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    write_jsonl_gz(tmp_path, [SHORT])
    assert load_hh(source=tmp_path, tokenizer=word_tokenizer, max_length=9)[1].kept == 1
    with pytest.raises(HHFormatError) as info:
        load_hh(source=tmp_path, tokenizer=word_tokenizer, max_length=8)
    assert info.value.report.skipped["over_length"] == 1


def test_tokenizer_alone_only_adds_stats_and_max_length_needs_one(tmp_path, word_tokenizer):
    write_jsonl_gz(tmp_path, [SHORT])
    _, report = load_hh(source=tmp_path, tokenizer=word_tokenizer)
    assert report.lengths["tokens"]["prompt"]["max"] == 5 and "tokens" in report.summary()
    with pytest.raises(ValueError, match="tokenizer"):
        load_hh(source=tmp_path, max_length=10)


# ----------------------------------------------------------------------------------------------------
# Views and the held-out split
# ----------------------------------------------------------------------------------------------------


def test_split_heldout_is_deterministic_grouped_and_order_free(real):
    examples, _ = real
    # Add pairs that share a prompt with existing ones: they must land on the same side.
    twins = [{**e, "id": e["id"] + "/twin"} for e in examples[:300]]
    pool = examples + twins
    train, heldout, info = split_heldout(pool, fraction=0.1, seed=0)
    again = split_heldout(pool, fraction=0.1, seed=0)
    assert (train, heldout) == again[:2]
    shuffled = pool[:]
    random.Random(1).shuffle(shuffled)
    s_train, s_heldout, _ = split_heldout(shuffled, fraction=0.1, seed=0)
    assert {e["id"] for e in s_heldout} == {e["id"] for e in heldout}
    ids_train, ids_heldout = {e["id"] for e in train}, {e["id"] for e in heldout}
    assert not ids_train & ids_heldout and len(ids_train | ids_heldout) == len(pool)
    for e in examples[:300]:
        assert (e["id"] in ids_heldout) == (e["id"] + "/twin" in ids_heldout)
    assert 0.07 < len(heldout) / len(pool) < 0.13
    assert info["n_train"] == len(train) and info["n_heldout"] == len(heldout)
    assert {"seed", "fraction", "method"} <= set(info)
    other = {e["id"] for e in split_heldout(pool, fraction=0.1, seed=1)[1]}
    assert other != ids_heldout


def test_related_conversations_stay_on_one_side_of_the_split_and_the_halves(real):
    """A conversation that extends another (or repeats its opening with other case and spacing) lands where the
    other does, in the held-out split and in the prompt halves: grouped by the first user turn."""
    examples, _ = real
    related = []
    for e in examples[:400]:
        opening = e["prompt"][0]
        longer = e["prompt"] + [{"role": "assistant", "content": "Why?"}, {"role": "user", "content": "Just curious."}]
        respaced = [{**opening, "content": "  " + opening["content"].upper().replace(" ", "   ") + " "}]
        related += [{**e, "id": e["id"] + "/longer", "prompt": longer}, {**e, "id": e["id"] + "/respaced", "prompt": respaced}]
    pool = examples + related
    _, heldout, _ = split_heldout(pool, fraction=0.1, seed=0)
    out = {e["id"] for e in heldout}
    assert any(e["id"] in out for e in examples[:400]), "some of them held out, so the check below means something"
    for e in examples[:400]:
        assert (e["id"] in out) == (e["id"] + "/longer" in out) == (e["id"] + "/respaced" in out)
    a = {e["id"] for e in data.half(pool, "a")}
    for e in examples[:400]:
        assert (e["id"] in a) == (e["id"] + "/longer" in a) == (e["id"] + "/respaced" in a)
    # on HH-RLHF itself: no held-out prompt opens with a training conversation's first user turn
    train, heldout, _ = split_heldout(examples, fraction=0.1, seed=0)
    assert not {data.group_key(e) for e in train} & {data.group_key(e) for e in heldout}


def test_sft_and_unpaired_views(real):
    examples, _ = real
    ex = examples[0]
    from workbench.training.train import _dataset

    sft = _dataset("sft", examples[:3])  # the SFT arm's view: prompt-completion, TRL trains on the completion
    assert sft[0] == {"prompt": ex["prompt"], "completion": ex["chosen"]}
    unpaired = unpaired_view(examples[:3])
    assert len(unpaired) == 6
    assert unpaired[0] == {
        "id": ex["id"] + "/chosen", "prompt": ex["prompt"], "completion": ex["chosen"], "label": True
    }
    assert unpaired[1]["completion"] == ex["rejected"] and unpaired[1]["label"] is False
    ds = to_dataset(unpaired)
    assert len(ds) == 6 and set(ds.column_names) == {"id", "prompt", "completion", "label"}


def test_the_unpaired_view_labels_a_reply_of_several_pairs_once_by_its_net_wins():
    """Every two of a prompt's replies paired (a gold-labelled dataset): a ranking a > b > c > d gives a and b one
    desirable row each and c and d one undesirable row each; with three replies the middle one (one win, one loss)
    is left out and counted; another prompt's identical reply is another row."""
    p, q = [{"role": "user", "content": "hi"}], [{"role": "user", "content": "bye"}]
    r = {x: [{"role": "assistant", "content": x}] for x in "abcd"}
    four = [{"id": f"p#{i}{j}", "prompt": p, "chosen": r[i], "rejected": r[j]}
            for i, j in ("ab", "ac", "ad", "bc", "bd", "cd")]
    three = [{"id": f"q#{i}{j}", "prompt": q, "chosen": r[i], "rejected": r[j]} for i, j in ("ab", "ac", "bc")]
    counts = {}
    rows = unpaired_view(four + three, counts)
    got = {(row["prompt"][0]["content"], row["completion"][0]["content"]): row["label"] for row in rows}
    assert got == {("hi", "a"): True, ("hi", "b"): True, ("hi", "c"): False, ("hi", "d"): False,
                   ("bye", "a"): True, ("bye", "c"): False}
    assert counts == {"merged": 6, "even": 1}
    assert rows[0]["id"] == "p#ab/chosen"


def test_prompt_halves_are_disjoint_cover_everything_and_keep_shared_prompts_together(real):
    from workbench.modeling.data import half, prompt_view

    examples, _ = real
    twins = [{**e, "id": e["id"] + "/twin"} for e in examples[:200]]
    pool = examples + twins
    a, b = half(pool, "a"), half(pool, "b")
    ids_a, ids_b = {e["id"] for e in a}, {e["id"] for e in b}
    assert not ids_a & ids_b and len(ids_a | ids_b) == len(pool)
    assert 0.45 < len(a) / len(pool) < 0.55
    for e in examples[:200]:
        assert (e["id"] in ids_a) == (e["id"] + "/twin" in ids_a)
    with pytest.raises(ValueError, match="'a' or 'b'"):
        half(pool, "c")
    prompts = prompt_view(pool)
    assert len(prompts) == len({json.dumps(e["prompt"], sort_keys=True) for e in pool}) <= len(examples)
    assert prompts[0] == {"id": pool[0]["id"], "prompt": pool[0]["prompt"], "baseline": pool[0]["chosen"][0]["content"]}


def test_heldout_split_is_the_same_for_every_run_seed(hh_dir, smollm_tokenizer):
    """Every seed and arm is evaluated on the same held-out prompts: the split follows DataConfig.split_seed,
    not the run's seed (which is still recorded)."""
    from workbench.modeling.data import DataConfig
    from workbench.modeling.sources import load_for_run

    cfg = DataConfig(split="test", source=str(hh_dir))
    splits = [load_for_run(cfg, seed, smollm_tokenizer) for seed in (0, 1, 2)]
    assert splits[0][3]["heldout_ids"] == splits[1][3]["heldout_ids"] == splits[2][3]["heldout_ids"]
    assert [s[3]["run_seed"] for s in splits] == [0, 1, 2]
    other = load_for_run(DataConfig(split="test", source=str(hh_dir), split_seed=1), 0, smollm_tokenizer)[3]["heldout_ids"]
    assert other != splits[0][3]["heldout_ids"]
