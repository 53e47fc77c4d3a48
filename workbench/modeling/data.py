"""Load Anthropic HH-RLHF preference pairs, check them, and shape them for TRL.

The raw data (github anthropics/hh-rlhf, or the hub dataset ``Anthropic/hh-rlhf``) stores each pair as
two full transcripts, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``, that share
every turn but the last. ``load_hh`` turns each line into TRL's conversational preference format::

    {"id": "harmless-base/test/17",
     "prompt":   [{"role": "user", "content": ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}],
     "chosen":   [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

and returns a ``ValidationReport`` that accounts for every line read: ``read == kept + sum(skipped)``.

Quirks of the real data handled here (see ``tests/test_data.py`` for the counts on harmless-base/test):
  * "Human:" / "Assistant:" also occur *inside* turns (e.g. "Assistant: Human: ..."); only the markers
    that follow a blank line start a turn.
  * A few transcripts have two Assistant turns in a row. We merge consecutive same-role turns, so roles
    always alternate (chat templates insist on it) and the response is everything the assistant said
    after the last human turn.
  * Some final turns are empty ("...\\n\\nAssistant: "); such pairs are dropped and counted.

Local layout: ``<root>/<subset>/<split>.jsonl.gz`` (an uncompressed ``.jsonl`` is accepted too).

A *pairs folder* is the other kind of source: a folder holding ``pairs.jsonl``, one pair per line already in the
format above (``read_pairs``); the known-gold study's gold-labelled datasets are such folders (``gold_pairs.build``
writes them, a run folder with its recipe beside the pairs), and every arm that reads pairs reads them through
``sources.load_pairs`` exactly as it reads HH-RLHF: the same held-out split, halves, ``n_train`` and report. Your own
data in TRL's dataset formats (a file, a folder, a hub dataset) is ``sources.read_dataset``'s.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import statistics
import zlib
from pathlib import Path

from ..core import settings

SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")
HUB_NAME = "Anthropic/hh-rlhf"
ENV_VAR = "WORKBENCH_HH_SOURCE"

# Structural problems mean the file is not what we think it is: raise by default. Content filters drop
# pairs that are well-formed but useless for preference training: always counted, never raised.
STRUCTURAL = ("malformed_json", "missing_key", "not_a_transcript", "no_assistant_turn")
CONTENT_FILTERS = ("empty_final_turn", "identical_pair", "prompt_mismatch", "over_length")
SKIP_REASONS = STRUCTURAL + CONTENT_FILTERS

_FIXES = {  # what to do, appended to each HHFormatError
    "malformed_json": "Each line must be one JSON object; repair or delete the line",
    "missing_key": "Each line needs string fields 'chosen' and 'rejected'; repair the line",
    "not_a_transcript": "Texts must start with '\\n\\nHuman: '; check that the file is HH-RLHF data",
    "no_assistant_turn": "Texts must end with an '\\n\\nAssistant: <response>' turn; repair the line",
}

# A turn starts at a blank line followed by the speaker and a colon, then a space, a newline or the end
# of the text (an empty turn). "Human:" anywhere else is part of the content.
_MARKER = re.compile(r"\n\n(Human|Assistant):(?=[ \n]|\Z)")
_INLINE_MARKER = re.compile(r"(?<!\n\n)\b(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_MAX_EXAMPLES = 3  # locations kept per skip reason in the report


class HHFormatError(ValueError):
    """A line (or file) that is not HH-RLHF data; the message says where, which field, and what to do."""

    def __init__(self, location: str, line: int, field: str, problem: str, fix: str = "", unit: str = "line"):
        self.location, self.line, self.field, self.problem = location, line, field, problem
        super().__init__(f"{location} {unit} {line}, field {field!r}: {problem}. {fix}".strip())


class PairRejected(ValueError):
    """Why one pair was not kept; ``reason`` is one of ``SKIP_REASONS``, ``field`` the offending field."""

    def __init__(self, reason: str, field: str, problem: str):
        self.reason, self.field, self.problem = reason, field, problem
        super().__init__(f"{reason} ({field}): {problem}")


# --- Parsing one transcript / one pair ------------------------------------------------------------


def parse_transcript(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}].

    Contents are stripped; consecutive turns by the same speaker are merged (joined by a blank line).
    Raises ValueError when the text does not start with a Human/Assistant marker.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    # Leading whitespace varies between sources; normalise it so the first marker sits at position 0.
    body = "\n\n" + text.lstrip()
    if not _MARKER.match(body):
        raise ValueError(f"does not start with 'Human:' or 'Assistant:' (starts with {text[:30]!r})")
    # re.split with one group gives ['', speaker, content, speaker, content, ...]
    parts = _MARKER.split(body)[1:]
    messages: list[dict] = []
    for speaker, content in zip(parts[0::2], parts[1::2]):
        role, content = _ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(c for c in (messages[-1]["content"], content) if c)
        else:
            messages.append({"role": role, "content": content})
    return messages


def parse_pair(chosen: str, rejected: str) -> dict:
    """Two full transcripts -> {"prompt": [...], "chosen": [final assistant msg], "rejected": [...]}.

    Raises PairRejected with ``.reason`` in not_a_transcript, no_assistant_turn, empty_final_turn,
    prompt_mismatch or identical_pair.
    """
    sides = {}
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        try:
            messages = parse_transcript(text)
        except ValueError as e:
            raise PairRejected("not_a_transcript", field, str(e)) from None
        if messages[-1]["role"] != "assistant":
            raise PairRejected("no_assistant_turn", field, "the last turn is not an Assistant turn")
        if not messages[:-1] or messages[0]["role"] != "user":
            raise PairRejected("not_a_transcript", field, "no Human turn before the final Assistant turn")
        sides[field] = messages
    for field in ("chosen", "rejected"):
        if not sides[field][-1]["content"]:
            raise PairRejected("empty_final_turn", field, "the final Assistant turn is empty")
    if sides["chosen"][:-1] != sides["rejected"][:-1]:
        raise PairRejected("prompt_mismatch", "rejected", "chosen and rejected differ before the final turn")
    if sides["chosen"][-1] == sides["rejected"][-1]:
        raise PairRejected("identical_pair", "rejected", "the chosen and rejected responses are identical")
    return {"prompt": sides["chosen"][:-1], "chosen": sides["chosen"][-1:], "rejected": sides["rejected"][-1:]}


def render_hh(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Messages back to HH text: '\\n\\nHuman: a\\n\\nAssistant: b' (+ '\\n\\nAssistant:' to prompt a reply)."""
    speaker = {role: name for name, role in _ROLES.items()}
    text = "".join(f"\n\n{speaker[m['role']]}: {m['content']}" for m in messages)
    return text + "\n\nAssistant:" if add_generation_prompt else text


# --- The report -----------------------------------------------------------------------------------


@dataclasses.dataclass
class ValidationReport:
    """What ``load_hh`` read, kept and dropped, and why. ``read == kept + sum(skipped.values())``."""

    source: str  # the file read, or the root directory for subset="all", or "hub:Anthropic/hh-rlhf"
    read: int = 0  # non-blank lines (hub rows) read
    kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    examples: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {r: [] for r in SKIP_REASONS})
    lengths: dict = dataclasses.field(default_factory=dict)  # stats over kept pairs, see length_stats
    quirks: dict[str, int] = dataclasses.field(  # kept pairs that needed care; informational only
        default_factory=lambda: {"merged_same_role_turns": 0, "inline_role_marker": 0}
    )
    files: list[str] = dataclasses.field(default_factory=list)  # every file (or hub split) read

    def count(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < _MAX_EXAMPLES:
            self.examples[reason].append(where)

    def summary(self) -> str:
        lines = [f"HH-RLHF {self.source}", f"  read {self.read}, kept {self.kept}, skipped {self.read - self.kept}"]
        for reason, n in self.skipped.items():
            if n:
                # Locations relative to the source line up under it and stay short.
                at = [w.removeprefix(self.source).lstrip("/:") for w in self.examples[reason]]
                lines.append(f"    {reason}: {n}  (at {', '.join(at)})")
        rows = [("turns per pair", self.lengths.get("turns"))]
        for unit in ("chars", "tokens"):
            rows += [(f"{part} {unit}", s) for part, s in self.lengths.get(unit, {}).items()]
        for name, s in rows:
            if s:
                lines.append(f"  {name}: mean {s['mean']:.1f}, median {s['median']:g}, p95 {s['p95']}, max {s['max']}")
        if any(self.quirks.values()):
            lines.append("  quirks in kept pairs: " + ", ".join(f"{k} {v}" for k, v in self.quirks.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _stats(values: list[int]) -> dict:
    """mean / median / p95 (nearest rank) / max of a list of ints; zeros for an empty list."""
    if not values:
        return {"mean": 0.0, "median": 0, "p95": 0, "max": 0}
    ordered = sorted(values)
    p95 = ordered[-(-95 * len(ordered) // 100) - 1]  # ceil(0.95 n)-th smallest
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


def length_stats(examples: list[dict], tokens: list[tuple[int, int, int]] | None) -> dict:
    """Stats over kept pairs: turns, characters of prompt / chosen / rejected, and tokens when counted."""
    parts = ("prompt", "chosen", "rejected")
    out = {
        "turns": _stats([len(ex["prompt"]) + 1 for ex in examples]),
        "chars": {part: _stats([sum(len(m["content"]) for m in ex[part]) for ex in examples]) for part in parts},
    }
    if tokens is not None:
        prompt, chosen, rejected = (list(col) for col in zip(*tokens)) if tokens else ([], [], [])
        out["tokens"] = {
            "prompt": _stats(prompt),
            "chosen": _stats(chosen),
            "rejected": _stats(rejected),
            "total": _stats([p + max(c, r) for p, c, r in zip(prompt, chosen, rejected)]),
        }
    return out


# --- Finding and reading the data -----------------------------------------------------------------


def resolve_source(source: str | os.PathLike | None = None) -> str:
    """Where to read from: the given directory or "hub"; else $WORKBENCH_HH_SOURCE; else the first existing
    of <repo>/data/hh-rlhf and <repo>/../shared/data/hh-rlhf; else "hub"."""
    if source is None:
        source = settings.get(ENV_VAR)
    if source is None:
        repo = settings.REPO
        for candidate in (repo / "data" / "hh-rlhf", repo.parent / "shared" / "data" / "hh-rlhf"):
            if candidate.is_dir():
                return str(candidate.resolve())
        return "hub"
    if str(source) == "hub":
        return "hub"
    return str(Path(source).expanduser().resolve())


def _local_file(root: Path, subset: str, split: str) -> Path | None:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (root / subset / name).is_file():
            return root / subset / name
    return None


def _missing_file_error(root: Path, subset: str, split: str) -> FileNotFoundError:
    present = sorted(str(p.relative_to(root)) for p in root.glob("*/*.jsonl*")) if root.is_dir() else []
    where = f"found there: {', '.join(present)}" if present else "no <subset>/<split>.jsonl.gz files found there"
    where = where if root.is_dir() else (
        f"{root} is a file; a data source is a folder: an HH-RLHF copy or a gold-labelled pairs run" if root.is_file()
        else f"{root} does not exist")
    return FileNotFoundError(
        f"No HH-RLHF data for {subset}/{split}: expected {root / subset / (split + '.jsonl.gz')} ({where}). "
        f"Point {ENV_VAR} (or source=) at a directory laid out like github anthropics/hh-rlhf, "
        f"or use source='hub'."
    )


def _read_local(path: Path):
    """Yield (line_no, raw bytes) for each non-blank line; a file that cannot be read raises HHFormatError."""
    gz = path.suffix == ".gz"
    with open(path, "rb") as f:
        head = f.read(2)
    if gz and head != b"\x1f\x8b":
        # Checked up front: gzip would only fail on the first read, with a bare BadGzipFile.
        raise HHFormatError(
            str(path), 1, "<file>", f"not a gzip file (starts with {head!r})",
            "Re-download it, or if it is plain JSON Lines, name it .jsonl instead of .jsonl.gz.",
        )
    line_no = 0
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            for line_no, raw in enumerate(f, 1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
                    raw = raw[3:]
                if raw.strip():
                    yield line_no, raw
    except (OSError, EOFError, zlib.error) as e:
        # A truncated or corrupt archive: the lines after this point are lost, so never skip silently.
        raise HHFormatError(str(path), line_no + 1, "<file>", f"cannot decompress ({e})", "Re-download it.") from e


def _read_hub(subset: str, split: str):
    """Yield (row_no, row dict) from the hub dataset; row numbers are 1-based like file lines."""
    import datasets  # imported here: it is slow to import and only the hub path needs it

    try:
        rows = datasets.load_dataset(HUB_NAME, data_dir=subset, split=split)
    except Exception as e:  # offline, no cache, renamed dataset...: say what we tried and how to avoid it
        raise RuntimeError(
            f"Could not load {HUB_NAME} ({subset}/{split}) from the hub: {e}. No local copy was used; "
            f"set {ENV_VAR} to a directory laid out like github anthropics/hh-rlhf."
        ) from e
    yield from enumerate(rows, 1)


def _decode(raw) -> tuple[str, str]:
    """A raw line (bytes) or hub row (dict) -> (chosen, rejected) texts, or PairRejected."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PairRejected("malformed_json", "<json>", f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise PairRejected("malformed_json", "<json>", f"expected a JSON object, got {type(raw).__name__}")
    for field in ("chosen", "rejected"):
        if field not in raw:
            raise PairRejected("missing_key", field, f"key missing (keys present: {sorted(raw)})")
        if not isinstance(raw[field], str):
            raise PairRejected("missing_key", field, f"expected a string, got {type(raw[field]).__name__}")
    return raw["chosen"], raw["rejected"]


def prompt_text(tokenizer, prompt: list[dict]) -> str:
    # Without a chat template (e.g. a base model) the model would see the prompt the way HH wrote it.
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return render_hh(prompt, add_generation_prompt=True)


def token_lengths(tokenizer, pair: dict) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts. The prompt includes the template's generation prompt; the
    responses are content only (the end-of-turn tokens a template adds are not counted)."""

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = prompt_text(tokenizer, pair["prompt"])
    return n(prompt), n(pair["chosen"][0]["content"]), n(pair["rejected"][0]["content"])


# --- The loader -----------------------------------------------------------------------------------


def load_hh(
    subset: str = "harmless-base",
    split: str = "test",
    source: str | os.PathLike | None = None,
    *,
    on_error: str = "raise",
    tokenizer=None,
    max_length: int | None = None,
    limit: int | None = None,
) -> tuple[list[dict], ValidationReport]:
    """Load HH-RLHF pairs in TRL's conversational preference format, with a report of what was dropped.

    subset: one of SUBSETS, or "all" (every subset present locally; every subset on the hub).
    source: a directory (<root>/<subset>/<split>.jsonl.gz), "hub", or None (see ``resolve_source``).
    on_error: "raise" -> structural problems raise HHFormatError; "skip" -> they are counted in the report.
        Content filters (empty_final_turn, identical_pair, prompt_mismatch, over_length) always skip.
    tokenizer, max_length: with both, drop pairs whose prompt (rendered with the chat template and a
        generation prompt) plus the longer response exceed max_length tokens. A tokenizer alone only
        adds token statistics to the report.
    limit: stop once this many pairs are kept.
    """
    # --- check arguments
    if subset != "all" and subset not in SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; choose one of {SUBSETS} or 'all'")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer to count tokens with")

    # --- decide what to read: a list of (subset, location, row iterator factory)
    source = resolve_source(source)
    if source == "hub":
        subsets = SUBSETS if subset == "all" else (subset,)
        # "all" reads each subset separately (not data_dir=None) so ids name the subset, as for local files.
        plan = [(s, f"hub:{HUB_NAME}/{s}/{split}", lambda s=s: _read_hub(s, split)) for s in subsets]
        report = ValidationReport(source=f"hub:{HUB_NAME}")
    else:
        root = Path(source)
        if subset == "all":
            found = [(s, _local_file(root, s, split)) for s in SUBSETS]
            found = [(s, p) for s, p in found if p is not None]
            if not found:
                raise _missing_file_error(root, SUBSETS[0], split)
        else:
            path = _local_file(root, subset, split)
            if path is None:
                raise _missing_file_error(root, subset, split)
            found = [(subset, path)]
        plan = [(s, str(p), lambda p=p: _read_local(p)) for s, p in found]
        report = ValidationReport(source=plan[0][1] if subset != "all" else str(root))
    report.files = [location for _, location, _ in plan]

    # --- read, check, filter
    examples, tokens = [], []
    for sub, location, rows in plan:
        for line_no, raw in rows():
            if limit is not None and len(examples) >= limit:
                break
            report.read += 1
            try:
                chosen, rejected = _decode(raw)
                pair = parse_pair(chosen, rejected)
            except PairRejected as e:
                if e.reason in STRUCTURAL and on_error == "raise":
                    fix = _FIXES[e.reason] + ", or pass on_error='skip' to count and drop such lines."
                    raise HHFormatError(location, line_no, e.field, e.problem, fix) from None
                report.count(e.reason, f"{location}:{line_no}")
                continue
            if not _fits(tokenizer, pair, max_length, report, f"{location}:{line_no}", tokens):
                continue
            # Quirk counters: the same test the parser uses, so they say how often merging mattered.
            n_turns = len(pair["prompt"]) + 1
            if any(len(_MARKER.findall("\n\n" + t.lstrip())) != n_turns for t in (chosen, rejected)):
                report.quirks["merged_same_role_turns"] += 1
            if _INLINE_MARKER.search(chosen) or _INLINE_MARKER.search(rejected):
                report.quirks["inline_role_marker"] += 1
            examples.append({"id": f"{sub}/{split}/{line_no}", **pair})
        if limit is not None and len(examples) >= limit:
            break

    report.kept = len(examples)
    report.lengths = length_stats(examples, tokens if tokenizer is not None else None)
    assert report.read == report.kept + sum(report.skipped.values()), "a line was lost without being counted"
    if not examples and limit != 0:  # nothing to train on: say so here, not later inside a trainer
        skipped = ", ".join(f"{n} {why} (e.g. {report.examples[why][0]})" for why, n in report.skipped.items() if n)
        err = HHFormatError(", ".join(report.files), 0, "<file>",
                            f"no preference pairs: {report.read} non-blank line(s) read, skipped: {skipped or 'none'}",
                            "Point the source at a file of HH-RLHF pairs (and raise max_length if they were over length).")
        err.report = report  # what was read and skipped, for a caller that wants the counts
        raise err
    return examples, report


# --- A pairs folder: pairs already in the data layer's format ---------------------------------------

PAIRS_FILE = "pairs.jsonl"  # a pairs folder's pairs, one JSON object per line
_PAIR_FIX = ("Each line of a pairs file is one JSON object {\"id\": str, \"prompt\": [messages, user first, roles "
             "alternating], \"chosen\": [{\"role\": \"assistant\", \"content\": str}], \"rejected\": [...]}")


def is_pairs_folder(source) -> bool:
    """Is ``source`` a folder of pairs (it holds ``pairs.jsonl``), rather than an HH-RLHF directory or "hub"?"""
    return source not in (None, "hub") and (Path(source) / PAIRS_FILE).is_file()


def check_pair_row(row, location: str, line: int) -> dict:
    """``row`` if it is a pair in the data layer's format; else an HHFormatError naming the file, line and field.
    Raised for a missing or empty field, a prompt whose turns do not alternate from a user turn, and chosen ==
    rejected (a pair that prefers nothing)."""
    def bad(field, problem):
        return HHFormatError(location, line, field, problem, _PAIR_FIX + ".")

    if not isinstance(row, dict):
        raise bad("<json>", f"expected a JSON object, got {type(row).__name__}")
    for field in ("id", "prompt", "chosen", "rejected"):
        if field not in row:
            raise bad(field, f"missing (keys present: {sorted(row)})")
    prompt = row["prompt"]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
        raise bad("prompt", "must be a non-empty list of {role, content} messages")
    for i, m in enumerate(prompt):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want:
            raise bad("prompt", f"turn {i} has role {m.get('role')!r}, expected {want!r} (turns alternate, user first)")
        if not isinstance(m.get("content"), str):
            raise bad("prompt", f"turn {i} has no string content")
    for side in ("chosen", "rejected"):
        v = row[side]
        if not (isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant"):
            raise bad(side, "must be a list with one {\"role\": \"assistant\", \"content\": ...} message")
        if not isinstance(v[0].get("content"), str) or not v[0]["content"].strip():
            raise bad(side, "is empty")
    if row["chosen"][0]["content"] == row["rejected"][0]["content"]:
        raise bad("rejected", "is the same text as chosen")
    return row


def _fits(tokenizer, pair: dict, max_length: int | None, report: "ValidationReport", where: str, tokens: list) -> bool:
    """Whether ``pair`` fits ``max_length`` tokens (its prompt and longer reply); one that does not is counted as
    ``over_length`` at ``where``, one that does adds its token counts to ``tokens``. Without a tokenizer all fit."""
    if tokenizer is None:
        return True
    n_prompt, n_chosen, n_rejected = token_lengths(tokenizer, pair)
    if max_length is not None and n_prompt + max(n_chosen, n_rejected) > max_length:
        report.count("over_length", where)
        return False
    tokens.append((n_prompt, n_chosen, n_rejected))
    return True


def read_pairs(path, *, tokenizer=None, max_length: int | None = None) -> tuple[list[dict], "ValidationReport"]:
    """The pairs of a pairs file (``<folder>/pairs.jsonl``) and a report as ``load_hh``'s: every line checked
    (``check_pair_row``: a bad line is an error naming file, line and field), pairs over ``max_length`` tokens
    (with a tokenizer) skipped and counted."""
    path = Path(path)
    report = ValidationReport(source=str(path), files=[str(path)])
    examples, tokens = [], []
    for line_no, raw in _read_local(path):
        report.read += 1
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HHFormatError(str(path), line_no, "<json>", f"not valid JSON ({e})", _PAIR_FIX + ".") from None
        row = check_pair_row(row, str(path), line_no)
        if not _fits(tokenizer, row, max_length, report, f"{path}:{line_no}", tokens):
            continue
        examples.append(row)
    report.kept = len(examples)
    report.lengths = length_stats(examples, tokens if tokenizer is not None else None)
    if not examples:
        raise HHFormatError(str(path), 0, "<file>", f"no pairs: {report.read} line(s) read, {report.read - report.kept} "
                            "over max_length", "Point the source at a pairs file (and raise max_length if needed).")
    return examples, report


# --- Views for the trainers, and a held-out split -------------------------------------------------


def unpaired_view(examples: list[dict], counts: dict | None = None) -> list[dict]:
    """Pairs -> TRL unpaired preference rows (for KTO): one desirable and one undesirable row per pair,
    {"id": "<id>/chosen" | "<id>/rejected", "prompt", "completion", "label": True | False}.

    A reply that is in several pairs of its prompt (a gold-labelled dataset pairs every two of a prompt's k replies)
    is one row, labelled by its net wins: desirable if it won more of its pairs than it lost, undesirable if it lost
    more; one with as many wins as losses (the middle of an odd ranking) is left out, and ``counts`` (when given)
    receives ``merged`` (rows that stood for several pairs) and ``even`` (left out). Otherwise the middle replies of
    every prompt would be both desirable and undesirable. HH-RLHF's pairs share no reply: one row per reply as before."""
    net: dict[tuple, list] = {}  # (prompt, reply) -> [id, prompt, reply, wins - losses, pairs]
    for ex in examples:
        key = prompt_key(ex)
        for side, sign in (("chosen", 1), ("rejected", -1)):
            k = (key, json.dumps(ex[side], ensure_ascii=False, sort_keys=True))
            entry = net.setdefault(k, [f"{ex['id']}/{side}", ex["prompt"], ex[side], 0, 0])
            entry[3] += sign
            entry[4] += 1
    rows = [{"id": i, "prompt": p, "completion": c, "label": n > 0} for i, p, c, n, _ in net.values() if n != 0]
    if counts is not None:
        counts["merged"] = sum(1 for *_, n, m in net.values() if m > 1 and n != 0)
        counts["even"] = sum(1 for *_, n, _ in net.values() if n == 0)
    return rows


def prompt_view(examples: list[dict]) -> list[dict]:
    """Pairs -> the distinct prompts, {"id", "prompt", "baseline"}, in input order: the id of the first pair with that
    prompt and its chosen reply's text, the human-preferred answer a pairwise reward compares samples with
    (``rewards.JudgeReward``) and the evaluation's win rates are against. What the RL arms roll out on."""
    seen = {}
    for ex in examples:  # rows without a chosen reply (your prompt-only or unpaired data): a desirable one, or None
        good = ex.get("chosen") or (ex.get("completion") if ex.get("label", True) else None)
        seen.setdefault(prompt_key(ex), {"id": ex["id"], "prompt": ex["prompt"], "baseline": good[0]["content"] if good else None})
    return list(seen.values())


def prompt_key(ex: dict) -> str:
    """The prompt of a row (a list of messages) as one string: rows with the same prompt have the same key."""
    return json.dumps(ex["prompt"], ensure_ascii=False, sort_keys=True)


def group_key(ex: dict) -> str:
    """What keeps related conversations on one side of every split: the first user turn, case and spacing folded.
    HH-RLHF holds conversations that are prefixes or extensions of one another (test/370 is a prefix of test/481);
    grouped by the whole prompt, 23 of its 238 held-out prompts shared their opening with a training conversation.
    A row without a user turn is grouped by its whole prompt (``prompt_key``)."""
    first = next((m["content"] for m in ex["prompt"] if m.get("role") == "user"), None)
    return " ".join(first.casefold().split()) if first is not None else prompt_key(ex)


def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64  # uniform in [0, 1)


def half(examples: list[dict], which: str) -> list[dict]:
    """The pairs whose prompt falls in half "a" or "b" (a fixed hash of the conversation's first user turn,
    ``group_key``, independent of the seed and of the held-out split): two reward models trained on the two halves
    saw disjoint conversations, so one can serve as the other's gold evaluator."""
    if which not in ("a", "b"):
        raise ValueError(f"half must be 'a' or 'b' (got {which!r}).")
    return [ex for ex in examples if (_unit_hash("half\x00" + group_key(ex)) < 0.5) == (which == "a")]


def split_heldout(examples: list[dict], fraction: float = 0.1, seed: int = 0) -> tuple[list, list, dict]:
    """Deterministic train / held-out split, grouped by conversation (``group_key``: the first user turn).

    Each pair goes to held-out when sha256(seed, first user turn) falls below ``fraction`` of the hash range, so
    pairs that share a prompt, and conversations that extend one another, land on the same side (no prompt leaks
    into training) and a pair's side does not depend on the input order or on the other pairs. Both lists keep the input order. The
    held-out share is ``fraction`` only on average (it is a per-prompt coin flip).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    train, heldout = [], []
    for ex in examples:
        u = _unit_hash(f"{seed}\x00{group_key(ex)}")
        (heldout if u < fraction else train).append(ex)
    info = {
        "seed": seed,
        "fraction": fraction,
        "n_train": len(train),
        "n_heldout": len(heldout),
        "method": "sha256(seed, first user turn, case and spacing folded) / 2**64 < fraction -> heldout",
    }
    return train, heldout, info


@dataclasses.dataclass
class DataConfig:
    """Which pairs a run trains on and which it scores afterwards (every training arm has one)."""

    subset: str = "harmless-base"  # HH-RLHF subset, or "all"
    split: str = "train"  # file to read; "test" is the only one in the shared local copy
    # local hh-rlhf directory, "hub", a pairs folder (a gold-labelled dataset's run folder: ``read_pairs``), your own
    # data in TRL's formats (a .jsonl/.json/.parquet/.csv file, a folder of them, a hub dataset name:
    # ``sources.read_dataset``); None: $WORKBENCH_HH_SOURCE, a local copy of HH-RLHF, the hub
    source: str | None = None
    # your data's column names for TRL's (e.g. {"chosen": "good", "rejected": "bad"}, or "chosen=good,rejected=bad")
    columns: dict | str | list | None = None
    heldout_fraction: float = 0.1  # prompts held out of training (seeded hash of the first user turn), scored after
    # seeds the held-out split; fixed (not the run's seed) so that every seed and every arm is evaluated on the same
    # held-out prompts, none of which any of them trained on
    split_seed: int = 0
    half: str | None = None  # train only on prompt half "a" or "b" (see ``half``): e.g. a proxy RM and its gold RM
    n_train: int | None = None  # use only the first n training pairs (None: all)
    n_score: int = 64  # held-out pairs (RL arms: also held-out prompts) scored per sample and per token afterwards
    max_length: int = 512  # pairs longer than this (tokens) are skipped and counted in the data report


def to_dataset(rows: list[dict]):
    """A list of row dicts -> ``datasets.Dataset`` (what TRL trainers take)."""
    import datasets

    return datasets.Dataset.from_list(rows)
