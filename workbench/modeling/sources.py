"""Where a run's rows come from (``load_pairs``, ``load_for_run``): HH-RLHF (``data.load_hh``), a pairs folder
(``data.read_pairs``: a gold-labelled dataset), or your own data, in TRL's dataset formats: a local file or folder (JSON Lines, JSON, Parquet, CSV) or a hub
dataset, read through ``datasets.load_dataset`` and turned into the data layer's rows, so that every arm, the
held-out split, the prompt halves, ``n_train`` and the data report treat it exactly as HH-RLHF.

The formats (TRL's "Dataset formats and types"; each column standard text or conversational messages):

==========================  =============================================  ===========================================
format                      columns                                        which arms
==========================  =============================================  ===========================================
preference                  ``prompt``, ``chosen``, ``rejected``           all (SFT trains on ``chosen``)
preference, implicit prompt ``chosen``, ``rejected`` (the prompt is what   all
                            they share: the turns before the last, or the
                            common text prefix; HH-RLHF's own transcripts
                            are parsed as ``load_hh`` parses them)
unpaired preference         ``prompt``, ``completion``, ``label`` (bool)   KTO; the RL arms (its prompts)
prompt-completion           ``prompt``, ``completion``                     SFT; the RL arms (its prompts)
prompt-only                 ``prompt``                                     the RL arms (PPO, RLOO, GRPO, online DPO)
==========================  =============================================  ===========================================

Standard text becomes one user turn (a prompt) or one assistant turn (a reply); conversational columns are lists of
``{"role", "content"}`` messages, a prompt's turns alternating from a user turn. ``columns`` maps the format's names
to yours (``{"chosen": "good", "rejected": "bad"}``; on the command line ``--columns chosen=good,rejected=bad``).

A row that is not what its format says is an ``HHFormatError`` naming the file, the row (the line of a JSON Lines
file) and the column, and what the formats are; with ``on_error="skip"`` it is counted in the report instead. Exact
duplicates and rows over ``max_length`` tokens are always skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import (PAIRS_FILE, DataConfig, HHFormatError, PairRejected, ValidationReport, check_pair_row, half,
                   is_pairs_folder, length_stats, load_hh, parse_pair, prompt_text, read_pairs, split_heldout,
                   token_lengths)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FORMATS = {  # the format of a row set, from its columns (first match wins)
    "preference": ("prompt", "chosen", "rejected"),
    "preference, implicit prompt": ("chosen", "rejected"),
    "unpaired preference": ("prompt", "completion", "label"),
    "prompt-completion": ("prompt", "completion"),
    "prompt-only": ("prompt",),
}
PAIRED = ("preference", "preference, implicit prompt")
FIX = ("The formats (TRL's): preference {prompt, chosen, rejected}; implicit prompt {chosen, rejected}; unpaired "
       "{prompt, completion, label}; prompt-completion {prompt, completion}; prompt-only {prompt}; each a string or "
       "a list of {role, content} messages. Rename columns with --columns chosen=<yours>,rejected=<yours>")
SKIPS = ("bad_row", "duplicate", "over_length")


def parse_columns(columns) -> dict[str, str]:
    """``{"chosen": "good"}`` from a dict, ``"chosen=good,rejected=bad"`` or ``["chosen=good", ...]`` (what the
    command line hands over); {} for None."""
    if columns is None:
        return {}
    if isinstance(columns, dict):
        items = list(columns.items())
    else:
        parts = columns.split(",") if isinstance(columns, str) else list(columns)
        items = []
        for part in parts:
            if "=" not in str(part):
                raise ValueError(f"columns: {part!r} is not format_name=your_column (e.g. chosen=good,rejected=bad)")
            items.append(tuple(s.strip() for s in str(part).split("=", 1)))
    known = {c for cols in FORMATS.values() for c in cols} | {"id"}
    bad = [k for k, _ in items if k not in known]
    if bad:
        raise ValueError(f"columns: {', '.join(map(repr, bad))} is not a column of TRL's formats ({', '.join(sorted(known))})")
    return {str(k): str(v) for k, v in items}


def is_dataset_source(source) -> bool:
    """A source ``read_dataset`` reads: a data file, or a folder holding data files at its top level (not an
    HH-RLHF copy laid out in <subset>/<split> folders, nor a pairs folder)."""
    if source in (None, "hub"):
        return False
    path = Path(source)
    if path.is_file():
        return True
    return path.is_dir() and not (path / "pairs.jsonl").is_file() and bool(_data_files(path))


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in BUILDERS)


def _rows_of_file(path: Path, split: str) -> tuple[list[dict], list[int], str]:
    """One file's rows through ``datasets.load_dataset``, with where each row is: (rows, numbers, unit), the line
    of a JSON Lines file (a line that is not JSON is an error naming it) or the row (from 1) of any other file."""
    import datasets

    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise HHFormatError(str(path), 0, "<file>", f"not a data file ({path.suffix or 'no extension'})",
                            f"Give a {', '.join(BUILDERS)} file or a folder of them. " + FIX + ".")
    lines = None
    if builder == "json" and not path.read_text(errors="replace").lstrip().startswith("["):  # JSON Lines
        lines = []
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HHFormatError(str(path), line_no, "<json>", f"not valid JSON ({e.msg}, column {e.colno})",
                                        "Each line of a .jsonl file is one JSON object; repair or delete the line. "
                                        + FIX + ".") from None
                if not isinstance(obj, dict):
                    raise HHFormatError(str(path), line_no, "<json>", f"is a JSON {type(obj).__name__}, not an object",
                                        FIX + ".")
                lines.append(line_no)
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
    except Exception as e:  # noqa: BLE001 -- the loader's many errors, each named with the file
        raise HHFormatError(str(path), 0, "<file>", f"could not be read as {builder}: {type(e).__name__}: {e}",
                            FIX + ".") from None
    if lines is not None and len(lines) == len(rows):
        return rows, lines, "line"
    return rows, list(range(1, len(rows) + 1)), "row"


def _rows_of_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split).to_list()
        return rows, list(range(1, len(rows) + 1)), "row"
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(
            f"Data source {name!r} is no local file or folder, and the hub dataset of that name could not be loaded "
            f"({type(e).__name__}: {e}). Give a local .jsonl/.json/.parquet/.csv file or folder, or a hub name "
            "(with network access).") from None


def _bad(where: tuple, field: str, problem: str, fix: str) -> HHFormatError:
    """The error of one row: ``where`` is (file, number, "line" or "row")."""
    location, number, unit = where
    return HHFormatError(location, number, field, problem, fix, unit=unit)


def _messages(value, role: str, where: tuple, column: str) -> list[dict]:
    """A column's value as messages: a string is one ``role`` turn; a list must be {role, content} dicts."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and m.get("role") in ("system", "user", "assistant") for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise _bad(where, column, f"must be a string or a non-empty list of {{role, content}} messages "
                        f"(got {type(value).__name__})", FIX + ".")


def _reply(value, where: tuple, column: str) -> list[dict]:
    msgs = _messages(value, "assistant", where, column)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _bad(where, column, f"must be one assistant reply (got {len(msgs)} message(s), roles "
                            f"{[m['role'] for m in msgs]})", "Put the turns before the reply in 'prompt'. " + FIX + ".")
    return msgs


def _prompt(value, where: tuple) -> list[dict]:
    msgs = _messages(value, "user", where, "prompt")
    if msgs[0]["role"] == "system":  # a system turn is kept as the first user turn's preamble
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise _bad(where, "prompt", "a system turn must be followed by a user turn", FIX + ".")
        msgs = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}, *msgs[2:]]
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise _bad(where, "prompt", f"turn {i} has role {m['role']!r}, expected {want!r} (turns alternate, "
                                "user first, and the prompt ends with a user turn)", FIX + ".")
    if msgs[-1]["role"] != "user":
        raise _bad(where, "prompt", "ends with an assistant turn; a prompt ends with the user's turn", FIX + ".")
    return msgs


def _implicit(chosen, rejected, where: tuple) -> dict:
    """(prompt, chosen, rejected) of an implicit-prompt pair."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        if chosen.startswith("\n\nHuman:") and rejected.startswith("\n\nHuman:"):  # HH-RLHF's own transcripts
            try:
                return parse_pair(chosen, rejected)
            except PairRejected as e:
                raise _bad(where, e.field, e.problem, FIX + ".") from None
        n = 0  # the common prefix, back to a word boundary (as TRL's extract_prompt)
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
        if not chosen[:n].strip():
            raise _bad(where, "chosen", "shares no prompt with 'rejected' (no common text before the replies)",
                                "Give a 'prompt' column. " + FIX + ".")
        return {"prompt": [{"role": "user", "content": chosen[:n].strip()}],
                "chosen": [{"role": "assistant", "content": chosen[n:].strip()}],
                "rejected": [{"role": "assistant", "content": rejected[n:].strip()}]}
    c, r = _messages(chosen, "assistant", where, "chosen"), _messages(rejected, "assistant", where, "rejected")
    if len(c) < 2 or c[:-1] != r[:-1]:
        raise _bad(where, "rejected", "differs from 'chosen' before their last turn (an implicit prompt is "
                            "every turn but the last, the same in both)", FIX + ".")
    return {"prompt": _prompt(c[:-1], where), "chosen": _reply(c[-1:], where, "chosen"),
            "rejected": _reply(r[-1:], where, "rejected")}


def _label(value, where: tuple) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise _bad(where, "label", f"must be true or false (got {value!r})", FIX + ".")


def _row(raw: dict, fmt: str, where: tuple, default_id: str) -> dict:
    rid = str(raw["id"]) if raw.get("id") not in (None, "") else default_id
    if fmt == "preference, implicit prompt":
        return {"id": rid, **_implicit(raw["chosen"], raw["rejected"], where)}
    row = {"id": rid, "prompt": _prompt(raw["prompt"], where)}
    if fmt == "preference":
        row.update(chosen=_reply(raw["chosen"], where, "chosen"), rejected=_reply(raw["rejected"], where, "rejected"))
    elif fmt in ("unpaired preference", "prompt-completion"):
        row["completion"] = _reply(raw["completion"], where, "completion")
        if not row["completion"][0]["content"].strip():
            raise _bad(where, "completion", "is empty", FIX + ".")
        if fmt == "unpaired preference":
            row["label"] = _label(raw["label"], where)
    return row


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _checked_pair(row: dict, where: tuple) -> dict:
    """``data.check_pair_row``'s checks (an empty reply, chosen == rejected, ...), named with this file's unit."""
    try:
        return check_pair_row(row, where[0], where[1])
    except HHFormatError as e:
        raise _bad(where, e.field, e.problem, FIX + ".") from None


def detect_format(columns) -> str | None:
    have = set(columns)
    return next((name for name, cols in FORMATS.items() if set(cols) <= have), None)


def read_dataset(source, *, split: str = "train", columns=None, tokenizer=None, max_length: int | None = None,
                 on_error: str = "raise") -> tuple[list[dict], ValidationReport, str]:
    """(rows, report, format) of a data file, a folder of them or a hub dataset (``is_dataset_source``), in the
    data layer's form: pairs as ``load_hh`` gives them ({id, prompt, chosen, rejected}, messages), unpaired rows
    {id, prompt, completion, label}, prompt-completion {id, prompt, completion}, prompt-only {id, prompt}."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    mapping = parse_columns(columns)
    path = Path(str(source)).expanduser()
    if path.exists():
        files = [path] if path.is_file() else _data_files(path)
        if not files:
            raise HHFormatError(str(path), 0, "<folder>", f"holds no {', '.join(BUILDERS)} file", FIX + ".")
        plan = [(str(f), lambda f=f: _rows_of_file(f, split)) for f in files]
    else:
        plan = [(f"hub:{source}/{split}", lambda: _rows_of_hub(str(source), split))]
    report = ValidationReport(source=str(path) if path.exists() else f"hub:{source}", files=[w for w, _ in plan])
    report.skipped.update(dict.fromkeys(SKIPS, 0))
    report.examples.update({k: [] for k in SKIPS})
    rows, seen, tokens, fmt = [], set(), [], None
    for location, read in plan:
        raw_rows, numbers, unit = read()
        for i, raw in enumerate(raw_rows):
            where = (location, numbers[i], unit)
            raw = {k: raw.get(v) for k, v in mapping.items()} | {k: v for k, v in raw.items() if k not in mapping.values()}
            if fmt is None:
                fmt = detect_format(k for k, v in raw.items() if v is not None)
                if fmt is None:
                    have = ", ".join(sorted(raw)) or "none"
                    raise _bad(where, "<columns>", f"has columns {have}: none of TRL's formats", FIX + ".")
            report.read += 1
            missing = [c for c in FORMATS[fmt] if raw.get(c) is None]
            try:
                if missing:
                    raise _bad(where, missing[0], f"is missing (the file is in the {fmt} format: "
                                        f"{', '.join(FORMATS[fmt])})", FIX + ".")
                row = _row(raw, fmt, where, f"{Path(location).stem}/{i}")
                if fmt in PAIRED:
                    row = _checked_pair(row, where)
            except HHFormatError as e:
                if on_error == "raise":
                    raise
                report.count("bad_row", f"{location}:{numbers[i]} ({e.field}: {e.problem})")
                continue
            at = f"{location}:{numbers[i]}"
            key = json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True)
            if key in seen:
                report.count("duplicate", at)
                continue
            seen.add(key)
            if tokenizer is not None:
                n = token_lengths(tokenizer, row) if fmt in PAIRED else (
                    _count(tokenizer, prompt_text(tokenizer, row["prompt"])),
                    *[_count(tokenizer, row["completion"][0]["content"])] * ("completion" in row))
                if max_length is not None and n[0] + max(n[1:], default=0) > max_length:
                    report.count("over_length", at)
                    continue
                if fmt in PAIRED:
                    tokens.append(n)
            rows.append(row)
    report.kept = len(rows)
    report.lengths = length_stats(rows, tokens if tokenizer is not None else None) if fmt in PAIRED else {}
    assert report.read == report.kept + sum(report.skipped.values()), "a row was lost without being counted"
    if not rows:
        raise HHFormatError(report.source, 0, "<file>", f"no rows left: {report.read} read, skipped "
                            f"{ {k: v for k, v in report.skipped.items() if v} }", FIX + ".")
    return rows, report, fmt


def load_pairs(cfg: DataConfig, tokenizer=None, max_length: int | None = None):
    """(rows, report) of a data config's source: a pairs folder (``data.read_pairs``), your own data in TRL's
    formats (``read_dataset``: a file, a folder of files, a hub dataset other than HH-RLHF) or HH-RLHF
    (``data.load_hh``: a local copy laid out as github anthropics/hh-rlhf, "hub", or None)."""
    if is_pairs_folder(cfg.source):
        return read_pairs(Path(cfg.source) / PAIRS_FILE, tokenizer=tokenizer, max_length=max_length)
    if is_dataset_source(cfg.source) or (cfg.source not in (None, "hub") and not Path(str(cfg.source)).exists()):
        rows, report, _ = read_dataset(cfg.source, split=cfg.split, columns=cfg.columns, tokenizer=tokenizer,
                                       max_length=max_length)
        return rows, report
    return load_hh(cfg.subset, cfg.split, cfg.source, tokenizer=tokenizer, max_length=max_length)


def row_format(rows: list[dict]) -> str:
    """The format of the data layer's rows (``FORMATS``' names), from the first row's keys."""
    keys = set(rows[0]) if rows else set()
    return ("preference" if {"chosen", "rejected"} <= keys else "unpaired preference" if "label" in keys
            else "prompt-completion" if "completion" in keys else "prompt-only")


def load_for_run(cfg: DataConfig, seed: int, tokenizer=None, pairs: list[dict] | None = None):
    """The training and held-out rows of a run: (train_rows, heldout, report or None, split record).

    ``pairs`` replaces the config's source (``load_pairs``) with your own rows (no report). The held-out split is
    seeded by ``cfg.split_seed`` (the run's ``seed`` only names the run and is recorded); then ``cfg.half`` and
    ``cfg.n_train`` narrow the training rows. The split record (ids on each side, how they were chosen) goes into
    the run folder as split.json."""
    report = None
    if pairs is None:
        pairs, report = load_pairs(cfg, tokenizer=tokenizer, max_length=cfg.max_length)
    train_rows, heldout, info = split_heldout(pairs, cfg.heldout_fraction, seed=cfg.split_seed)
    train_rows = half(train_rows, cfg.half) if cfg.half else train_rows
    train_rows = train_rows[: cfg.n_train] if cfg.n_train else train_rows
    info = {**info, "run_seed": seed, "half": cfg.half, "n_train_used": len(train_rows), "format": row_format(pairs),
            "train_ids": [ex["id"] for ex in train_rows], "heldout_ids": [ex["id"] for ex in heldout]}
    return train_rows, heldout, report, info
