"""The inspector: look inside a comparison sample by sample and token by token, from run folders only.

Two layers. ``InspectorModel`` is plain Python over DataFrames (loading, filters, sorting, paging, selection,
the per-token HTML), tested without a browser. ``Inspector`` puts ipywidgets and plotly FigureWidgets on top:

    run picker │ view (held-out pairs | generations | online pairs) │ filter │ sort
    one page of the sample table (paging: thousands of samples stay responsive)
    scatter (linked: box/lasso selection or a click selects samples) │ sample view: prompt, responses, and the
    per-token log-ratio log π − log π_ref as colour over the text, side by side for two runs
    drift over training (PPO's logged rollouts: KL and reward per iteration)

Only the parts that changed are redrawn: a page turn rewrites one HTML table; a new selection restyles the
scatter in place (``batch_update``) instead of building a new figure.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from ..modeling.runs import read_eval, read_jsonl, run_info, run_paths

PAGE_SIZE = 25

# name -> (views it applies to, mask of the rows to keep); "selected" is handled by the model
FILTERS = {
    "all": (("pairs", "generations", "online"), lambda d: np.ones(len(d), bool)),
    "implicit reward wrong, RM right": (("pairs",), lambda d: (d["correct"] == 0) & (d["rm_margin"] > 0)),
    "implicit reward right, RM wrong": (("pairs",), lambda d: (d["correct"] == 1) & (d["rm_margin"] <= 0)),
    "implicit reward wrong": (("pairs",), lambda d: d["correct"] == 0),
    "implicit reward wrong, length rule right": (("pairs",), lambda d: (d["correct"] == 0) & (d["length_rule"] == 1)),
    "highest KL (top 10%)": (("generations",), lambda d: d["kl"] >= d["kl"].quantile(0.9)),
    "longest responses (top 10%)": (("pairs", "generations", "online"), lambda d: d["length"] >= d["length"].quantile(0.9)),
    "loses to the chosen response": (("generations",), lambda d: d["gold_score"] < d["chosen_gold_score"]),
    # where reward hacks live: samples the proxy rates far above what the gold says (top 10% of proxy − gold)
    "proxy far above gold (top 10%)": (("generations",),
                                       lambda d: d["proxy_minus_gold"] >= d["proxy_minus_gold"].quantile(0.9)),
    "ties kept out: smallest label gaps (bottom 10%)": (("online",), lambda d: d["label_gap"] <= d["label_gap"].quantile(0.1)),
    "selected": (("pairs", "generations", "online"), None),
}
COLUMNS = {
    # lengths: tokens of the evaluation's one length tokenizer; length_rule: the credit of the length-only rule
    # fitted on training pairs (1 right, 0 wrong, 0.5 equal lengths)
    "pairs": ["run", "id", "chosen_reward", "rejected_reward", "margin", "correct", "rm_margin", "gold_margin",
              "chosen_length", "rejected_length", "length_rule"],
    # gold, proxy (score) and implicit reward β·Σ log π/π_ref side by side; proxy_minus_gold: the two rewards in units
    # of their spread over every sample loaded, z(proxy) − z(gold): sort by it to find the proxy's blind spots
    "generations": ["run", "id", "sample", "gold_score", "score", "implicit_reward", "proxy_minus_gold",
                    "chosen_gold_score", "kl", "response_tokens", "ended"],
    # the pairs online DPO sampled and labelled during training (records/online_pairs.jsonl), with their round
    "online": ["run", "round", "id", "chosen_label", "rejected_label", "label_gap", "chosen_kl", "rejected_kl"],
}
SCATTERS = {"pairs": ("rm_margin", "margin"), "generations": ("kl", "gold_score"), "online": ("round", "label_gap")}


def _label(path: Path) -> str:
    info = run_info(path)
    beta = "" if info["beta"] is None else f" β={info['beta']:g}"
    return f"{info['method']}{beta} s{info['seed']} ({path.name.split('__')[1]})"


def proxy_minus_gold(gens: pd.DataFrame) -> pd.Series:
    """z(proxy) − z(gold) of each sample, each reward standardised over all the samples given (the two are in other
    units): high where the proxy likes a sample far more than the gold does, the place to look for reward hacks.
    NaN where either reward is missing."""
    if not {"score", "gold_score"} <= set(gens) or gens["score"].isna().all() or gens["gold_score"].isna().all():
        return pd.Series(np.nan, index=gens.index)

    def z(x):
        x = x.astype(float)
        return (x - x.mean()) / (x.std() if x.std() > 0 else 1.0)

    return z(gens["score"]) - z(gens["gold_score"])


class InspectorModel:
    """Samples of evaluated runs as DataFrames: ``pairs`` (held-out pairs under each policy), ``generations`` (each
    policy's samples) and ``online`` (the pairs an online DPO run sampled and labelled while training, with their
    round); rows are keyed by (run, id[, sample]), online pairs by (run, id, round)."""

    def __init__(self, runs, eval_name: str = "default"):
        runs = run_paths(runs)
        self.paths = {}
        pairs, gens, online, rm, roles = [], [], [], {}, {}
        for p in runs:
            try:
                ev = read_eval(p, eval_name)
            except FileNotFoundError:
                continue
            label = _label(p)
            if run_info(p)["is_reward_model"]:  # the RMs' margins on the same pairs, joined onto every policy's rows
                rm[str(p.resolve())] = {r["id"]: r["margin"] for r in ev["pairs"]}
                continue
            # which reward runs the policies were judged by, as their evaluation recorded (not the runs' names)
            for role in ("proxy", "gold"):
                if ev["config"].get(f"{role}_reward_model"):
                    roles.setdefault(role, str(Path(ev["config"][f"{role}_reward_model"]).resolve()))
            self.paths[label] = p
            pairs += [{**r, "run": label} for r in ev["pairs"]]
            gens += [{**g, "run": label} for g in ev["generations"]]
            if (p / "records" / "online_pairs.jsonl").exists():
                online += [{**r, "run": label, "label_gap": r["chosen_label"] - r["rejected_label"],
                            "length": max(len(r["chosen_token_ids"]), len(r["rejected_token_ids"]))}
                           for r in read_jsonl(p / "records" / "online_pairs.jsonl")]
        if not self.paths:
            raise ValueError(f"No evaluated policy runs (eval/{eval_name}/) among {len(list(runs))} run folder(s): "
                             "run evaluate.evaluate_runs first.")
        self.pairs = pd.DataFrame(pairs)
        self.generations = pd.DataFrame(gens)
        self.online = pd.DataFrame(online)
        # the proxy and gold reward models' margins; with no role recorded (policies evaluated without reward
        # models), the one reward run evaluated is shown as the proxy
        proxy = rm.get(roles.get("proxy"), next(iter(rm.values())) if len(rm) == 1 else {})
        self.pairs["rm_margin"] = self.pairs["id"].map(proxy).astype(float)
        self.pairs["gold_margin"] = self.pairs["id"].map(rm.get(roles.get("gold"), {})).astype(float)
        if "chosen_length" not in self.pairs:  # evaluated before lengths had one unit: the policy's own tokens
            self.pairs["chosen_length"], self.pairs["rejected_length"] = self.pairs["chosen_tokens"], self.pairs["rejected_tokens"]
            self.pairs["length_rule"] = np.nan
        self.pairs["length"] = self.pairs[["chosen_length", "rejected_length"]].max(axis=1)
        if len(self.generations):
            self.generations["length"] = self.generations["response_tokens"]
            self.generations["proxy_minus_gold"] = proxy_minus_gold(self.generations)
        self.selected: set = set()  # keys (run, id[, sample]) chosen in the scatter or the table
        self._tokenizers, self._drift = {}, {}

    # --- the table
    def frame(self, view: str) -> pd.DataFrame:
        return {"pairs": self.pairs, "generations": self.generations, "online": self.online}[view]

    @staticmethod
    def key(view: str, row) -> tuple:
        if view == "online":
            return row["run"], row["id"], int(row["round"])
        return (row["run"], row["id"]) if view == "pairs" else (row["run"], row["id"], int(row["sample"]))

    def rows(self, view: str, runs: list[str] | None = None, filter_name: str = "all", sort: str | None = None,
             descending: bool = True) -> pd.DataFrame:
        """The table's rows: the chosen runs, one filter, one sort column."""
        df = self.frame(view)
        if df.empty:
            return df
        df = df[df["run"].isin(runs)] if runs else df
        views, mask = FILTERS[filter_name]
        if view not in views:
            raise ValueError(f"filter '{filter_name}' does not apply to {view}; it applies to {views}.")
        if filter_name == "selected":
            df = df[[self.key(view, r) in self.selected for _, r in df.iterrows()]]
        elif len(df):
            df = df[np.asarray(mask(df), bool)]
        return df.sort_values(sort, ascending=not descending, kind="stable") if sort else df

    @staticmethod
    def page(df: pd.DataFrame, number: int, size: int = PAGE_SIZE) -> tuple[pd.DataFrame, int]:
        """(rows of page ``number``, number of pages); the number is clamped into range."""
        pages = max(1, -(-len(df) // size))
        number = min(max(number, 0), pages - 1)
        return df.iloc[number * size : (number + 1) * size], pages

    def table_html(self, view: str, df: pd.DataFrame) -> str:
        cols = [c for c in COLUMNS[view] if c in df]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = []
        for _, r in df.iterrows():
            cls = ' class="wb-selected"' if self.key(view, r) in self.selected else ""
            cells = "".join(f"<td>{_cell(r[c])}</td>" for c in cols)
            body.append(f"<tr{cls}>{cells}</tr>")
        return (f'<table class="wb-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
                if body else '<p class="wb-empty">no samples match</p>')

    # --- selection (from the scatter or the table)
    def select(self, view: str, df: pd.DataFrame, positions) -> set:
        """Select the rows at ``positions`` of ``df`` (e.g. the points picked in a scatter drawn from ``df``)."""
        self.selected = {self.key(view, df.iloc[i]) for i in positions}
        return self.selected

    # --- one sample, token by token
    def tokenizer(self, run: str):
        from ..modeling import models

        name = run_info(self.paths[run])["config"]["model"]["model_name_or_path"]
        if name not in self._tokenizers:
            self._tokenizers[name] = models.load_tokenizer(name)
        return self._tokenizers[name]

    def sample_html(self, view: str, key: tuple) -> str:
        """The prompt (every turn), then the responses with each token coloured by log π − log π_ref."""
        run = key[0]
        tok = self.tokenizer(run)
        df = self.frame(view)
        extra = {"generations": "sample", "online": "round"}.get(view)
        row = df[(df["run"] == run) & (df["id"] == key[1]) & ((df[extra] == key[2]) if extra else True)]
        if row.empty:
            return f"<p>{html.escape(str(key))}: not in this run</p>"
        r = row.iloc[0]
        parts = [f'<div class="wb-sample"><h4>{html.escape(run)} · {html.escape(str(key[1]))}</h4>']
        if view == "online":  # sampled by the policy in round r, labelled by the run's reward model or judge
            parts.append(f"<p>round {int(r['round'])}</p>" + _prompt_html(r["prompt"]))
            for side in ("chosen", "rejected"):
                parts.append(f"<p><b>{side}</b> (label {r[f'{side}_label']:.3g}, KL {r[f'{side}_kl']:.3g})</p>")
                ids = r[f"{side}_token_ids"]
                parts.append(token_html(tok, ids, [0.0] * len(ids), scale=1.0))  # no per-token ratio was kept
        elif view == "pairs":
            if isinstance(r.get("prompt"), list):
                parts.append(_prompt_html(r["prompt"]))
            for side in ("chosen", "rejected"):
                parts.append(f"<p><b>{side}</b> (implicit reward {r[f'{side}_reward']:.3g})</p>")
                parts.append(token_html(tok, r[f"{side}_token_ids"], r[f"{side}_token_logratio"]))
        else:
            parts.append(_prompt_html(r["prompt"]))
            parts.append(f"<p><b>sample {int(r['sample'])}</b> (gold {_cell(r.get('gold_score'))}, "
                         f"KL {r['kl']:.3g})</p>")
            parts.append(token_html(tok, r["completion_token_ids"], r["token_logratio"]))
        return "".join(parts) + "</div>"

    def compare_html(self, view: str, key: tuple, other_run: str | None) -> str:
        """The sample under its run and, side by side, the same prompt/pair under ``other_run``."""
        left = self.sample_html(view, key)
        if not other_run or other_run == key[0]:
            return left
        right = self.sample_html(view, (other_run, *key[1:]))
        return f'<div style="display:flex;gap:1em"><div style="flex:1">{left}</div><div style="flex:1">{right}</div></div>'

    # --- drift over training
    def drift(self, run: str) -> pd.DataFrame:
        """Per logged training iteration: mean KL and reward of the samples (PPO's records/rollouts.jsonl); empty
        when the run logged no samples during training."""
        if run not in self._drift:  # read once: the file does not change under a finished run
            path = self.paths[run] / "records" / "rollouts.jsonl"
            df = pd.DataFrame(read_jsonl(path)) if path.exists() else pd.DataFrame()
            cols = [c for c in ("kl", "score", "gold_score") if c in df and df[c].notna().any()]
            self._drift[run] = df.groupby("iteration")[cols].mean().reset_index() if len(df) else df
        return self._drift[run]


def _cell(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "✓" if v else "✗"
    if isinstance(v, (float, np.floating)):
        return "–" if np.isnan(v) else f"{v:.3g}"
    return html.escape(str(v))


def _prompt_html(messages: list[dict]) -> str:
    return "".join(f'<p class="wb-turn"><b>{html.escape(m["role"])}:</b> {html.escape(m["content"])}</p>' for m in messages)


def token_html(tokenizer, token_ids: list[int], values: list[float], scale: float | None = None) -> str:
    """Each token as a span coloured by its value (blue > 0, red < 0, opacity ∝ |value| / scale), the value in its
    tooltip. ``scale``: the largest |value| of the response unless given."""
    vals = np.asarray(values, float)
    scale = scale or (float(np.abs(vals).max()) if len(vals) else 1.0) or 1.0
    spans = []
    for t, v in zip(token_ids, vals):
        text = html.escape(tokenizer.decode([t])).replace("\n", "↵<br>")
        a = min(abs(v) / scale, 1.0)
        color = f"rgba(31,119,180,{a:.2f})" if v > 0 else f"rgba(214,39,40,{a:.2f})"
        spans.append(f'<span class="wb-token" title="{v:+.4f}" style="background:{color}">{text}</span>')
    return '<div class="wb-tokens" style="line-height:1.8;font-family:monospace">' + "".join(spans) + "</div>"


class Inspector:
    """The widget: ``Inspector(runs_root).widget`` (or just ``Inspector(runs_root)`` as a notebook's last line)."""

    def __init__(self, runs, eval_name: str = "default", page_size: int = PAGE_SIZE):
        import ipywidgets as W
        import plotly.graph_objects as go

        self.model = InspectorModel(runs, eval_name)
        self._updating = False
        self.page_size, self.page_no, self.current = page_size, 0, pd.DataFrame()
        labels = list(self.model.paths)
        self.runs = W.SelectMultiple(options=labels, value=tuple(labels[:2]), description="runs", rows=min(6, len(labels)))
        self.view = W.ToggleButtons(options=["pairs", "generations"] + (["online"] if len(self.model.online) else []),
                                    description="view")
        self.filter = W.Dropdown(description="filter")
        self.sort = W.Dropdown(description="sort by")
        self.descending = W.Checkbox(value=True, description="descending")
        self.prev, self.next = W.Button(description="‹"), W.Button(description="›")
        self.page_label = W.Label()
        self.table = W.HTML()
        self.sample = W.Select(description="sample", rows=6, layout=W.Layout(width="60%"))
        self.sample.add_class("wb-sample-select")
        self.detail = W.HTML()
        self.scatter = go.FigureWidget(go.Scatter(mode="markers", marker=dict(size=7)),
                                       layout=dict(height=360, width=480, dragmode="lasso", template="plotly_white",
                                                   margin=dict(l=50, r=10, t=30, b=40)))
        self.drift = go.FigureWidget(layout=dict(height=280, width=480, template="plotly_white",
                                                 title="drift over training (logged samples)", margin=dict(t=40)))
        self.scatter.data[0].on_selection(self._on_select)
        self.scatter.data[0].on_click(self._on_select)
        for w in (self.runs, self.filter, self.sort, self.descending):
            w.observe(lambda _: self._refresh(reset=True), "value")
        self.view.observe(lambda _: self._set_view(), "value")
        self.sample.observe(lambda _: self._show_sample(), "value")
        self.prev.on_click(lambda _: self._turn(-1))
        self.next.on_click(lambda _: self._turn(+1))
        style = W.HTML("<style>.wb-table td,.wb-table th{padding:2px 8px;font-size:12px;white-space:nowrap}"
                       ".wb-selected{background:#fff3bf}</style>")
        self.widget = W.VBox([style, W.HBox([self.runs, W.VBox([self.view, self.filter, W.HBox([self.sort, self.descending])])]),
                              W.HBox([self.prev, self.page_label, self.next]), self.table, self.sample,
                              W.HBox([self.scatter, self.detail]), self.drift])
        self._set_view()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _set_view(self):
        view = self.view.value
        self._updating = True  # one refresh for the whole change, not one per widget
        self.filter.options = [n for n, (views, _) in FILTERS.items() if view in views]
        self.filter.value = "all"
        self.sort.options = [c for c in COLUMNS[view] if c not in ("run", "id")]
        self.sort.value = SCATTERS[view][1]
        self._updating = False
        self._refresh(reset=True)

    def _refresh(self, reset: bool = False):
        if self._updating:
            return
        view = self.view.value
        self.page_no = 0 if reset else self.page_no
        self.current = self.model.rows(view, list(self.runs.value), self.filter.value or "all", self.sort.value,
                                       self.descending.value)
        self._draw_page()
        x, y = SCATTERS[view]
        with self.scatter.batch_update():  # restyle in place: no new figure per change
            self.scatter.data[0].x = self.current[x].tolist() if x in self.current else []
            self.scatter.data[0].y = self.current[y].tolist() if y in self.current else []
            self.scatter.data[0].text = [str(k) for k in (self.model.key(view, r) for _, r in self.current.iterrows())]
            self.scatter.layout.xaxis.title, self.scatter.layout.yaxis.title = x, y
        self._draw_drift()

    def _draw_page(self):
        rows, pages = self.model.page(self.current, self.page_no, self.page_size)
        self.page_label.value = f"page {self.page_no + 1} / {pages} · {len(self.current)} samples"
        self.table.value = self.model.table_html(self.view.value, rows)
        keys = [self.model.key(self.view.value, r) for _, r in rows.iterrows()]
        self.sample.options = [(" · ".join(map(str, k)), k) for k in keys]

    def _turn(self, step: int):
        self.page_no += step
        _, pages = self.model.page(self.current, self.page_no, self.page_size)
        self.page_no = min(max(self.page_no, 0), pages - 1)
        self._draw_page()

    def _on_select(self, trace, points, _state=None):
        self.model.select(self.view.value, self.current, points.point_inds)
        with self.scatter.batch_update():
            self.scatter.data[0].selectedpoints = list(points.point_inds)
        if self.model.selected:
            key = next(iter(sorted(self.model.selected, key=str)))
            self.detail.value = self.model.compare_html(self.view.value, key, self._other_run(key[0]))
        self._draw_page()

    def _other_run(self, run: str) -> str | None:
        return next((r for r in self.runs.value if r != run), None)

    def _show_sample(self):
        if self.sample.value:
            key = self.sample.value
            self.detail.value = self.model.compare_html(self.view.value, key, self._other_run(key[0]))

    def _draw_drift(self):
        # the first chosen run that logged samples during training (PPO), else the first chosen run
        logged = [r for r in self.runs.value if not self.model.drift(r).empty]
        run = (logged or list(self.runs.value) or [None])[0]
        d = self.model.drift(run) if run else pd.DataFrame()
        with self.drift.batch_update():
            self.drift.data = []
            for col in [c for c in d.columns if c != "iteration"]:
                self.drift.add_scatter(x=d["iteration"], y=d[col], mode="lines+markers", name=col)
            self.drift.layout.title = (f"drift over training: {run}" if len(d) else
                                       f"{run}: no samples logged during training (PPO logs them)")


def inspect(runs, eval_name: str = "default") -> Inspector:
    """The inspector on a runs root or a list of run folders (what the inspector notebook calls)."""
    return Inspector(runs, eval_name)


__all__ = ["FILTERS", "Inspector", "InspectorModel", "inspect", "token_html"]
