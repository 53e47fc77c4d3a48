"""The inspector: the widget model (filters, sorting, paging, selection, linking, per-token colour) on run folders
with known numbers, the widget itself without a browser, and a real browser: JupyterLab on 127.0.0.1 opens the
inspector notebook in headless Chromium, runs it, and the table, a plotly plot and the coloured tokens render."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from workbench.reporting import widgets
from workbench.modeling.models import EMBEDDED_POLICY

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


def _run(root: Path, method: str, seed: int, pairs: list[dict], gens: list[dict], beta=0.1, name="default",
         rollouts: list[dict] | None = None) -> Path:
    path = root / f"{method}__{name}__s{seed}__20260101-000000-00000{seed}"
    (path / "eval" / "default").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed, "beta": beta, "model": {"model_name_or_path": EMBEDDED_POLICY}}))
    (path / "summary.json").write_text("{}")
    ev = path / "eval" / "default"
    ev.joinpath("pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    ev.joinpath("generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    ev.joinpath("config.json").write_text("{}")
    ev.joinpath("summary.json").write_text("{}")
    if rollouts:
        (path / "records").mkdir()
        (path / "records" / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm_tokenizer):
    """Two policies and a proxy RM over 40 pairs and 40 generations with known margins, real token ids."""
    root = tmp_path_factory.mktemp("inspect")
    ids = smollm_tokenizer("The answer is <b>no</b>, and here is why.", add_special_tokens=False)["input_ids"]
    prompt = [{"role": "user", "content": "Should I?"}]

    def pairs(sign):
        return [{"id": f"p{i}", "chosen_reward": sign * (i - 20) / 10, "rejected_reward": 0.0,
                 "margin": sign * (i - 20) / 10, "correct": sign * (i - 20) > 0, "chosen_tokens": len(ids),
                 "rejected_tokens": 3 + i, "chosen_token_ids": ids, "rejected_token_ids": ids[:3],
                 # lengths in the evaluation's one unit (tokens) and the fitted length rule's credit
                 "chosen_length": 10, "rejected_length": 100 - i, "length_rule": 1.0 if i < 8 else 0.0,
                 "chosen_token_logratio": [0.1 * (k - 3) for k in range(len(ids))],
                 "rejected_token_logratio": [-0.2, 0.0, 0.3], "prompt": prompt} for i in range(40)]

    def gens(scale):
        return [{"id": f"q{i // 2}", "sample": i % 2, "prompt": prompt, "completion": "x", "gold_score": scale * i,
                 "score": i, "chosen_gold_score": 20.0, "kl": float(i), "response_tokens": len(ids),
                 "ended": True, "completion_token_ids": ids, "token_logratio": [0.05] * len(ids)} for i in range(40)]

    rm = [{"id": f"p{i}", "margin": 1.0 if i % 2 else -1.0, "correct": bool(i % 2)} for i in range(40)]
    rollouts = [{"iteration": it, "id": "t", "kl": 0.1 * it, "score": 1.0 + it, "gold_score": None} for it in range(3)]
    _run(root, "dpo", 0, pairs(+1), gens(1.0))
    _run(root, "ppo", 0, pairs(-1), gens(2.0), beta=0.05, rollouts=rollouts)
    _run(root, "reward", 0, rm, [], beta=None, name="proxy")
    return root


def test_model_joins_runs_and_the_reward_model(runs):
    m = widgets.InspectorModel(runs)
    assert sorted(m.paths) == ["dpo β=0.1 s0 (default)", "ppo β=0.05 s0 (default)"]
    assert len(m.pairs) == 80 and len(m.generations) == 80
    assert m.pairs.set_index(["run", "id"]).loc[("dpo β=0.1 s0 (default)", "p3"), "rm_margin"] == 1.0


def test_filters_sorting_and_paging(runs):
    m = widgets.InspectorModel(runs)
    dpo = "dpo β=0.1 s0 (default)"
    wrong_rm_right = m.rows("pairs", [dpo], "implicit reward wrong, RM right")
    # dpo is wrong for i <= 20; the RM is right for odd i: 1, 3, ..., 19
    assert sorted(int(i[1:]) for i in wrong_rm_right["id"]) == list(range(1, 20, 2))
    top_kl = m.rows("generations", [dpo], "highest KL (top 10%)", sort="kl")
    assert list(top_kl["kl"]) == [39.0, 38.0, 37.0, 36.0]
    rows = m.rows("pairs", None, "all", sort="margin", descending=False)
    assert rows["margin"].is_monotonic_increasing and len(rows) == 80
    page, pages = m.page(rows, 99, size=25)  # clamped to the last page
    assert pages == 4 and len(page) == 5
    with pytest.raises(ValueError, match="does not apply"):
        m.rows("pairs", None, "highest KL (top 10%)")
    # the length-only rule (fitted on training pairs) is right for i < 8, dpo's implicit reward for i > 20
    assert sorted(int(i[1:]) for i in m.rows("pairs", [dpo], "implicit reward wrong, length rule right")["id"]) == list(range(8))
    # lengths in the evaluation's tokens: the longest pairs are those with the longest rejected response (i = 0..3)
    assert sorted(int(i[1:]) for i in m.rows("pairs", [dpo], "longest responses (top 10%)")["id"]) == [0, 1, 2, 3]
    assert "<th>length_rule</th>" in m.table_html("pairs", rows.head(2)) and "<th>chosen_length</th>" in m.table_html("pairs", rows.head(2))


def test_selection_links_scatter_table_and_sample_view(runs):
    m = widgets.InspectorModel(runs)
    rows = m.rows("generations", None, "all")
    m.select("generations", rows, [0, 5])
    assert m.selected == {m.key("generations", rows.iloc[0]), m.key("generations", rows.iloc[5])}
    sel = m.rows("generations", None, "selected")
    assert len(sel) == 2
    assert m.table_html("generations", sel).count('class="wb-selected"') == 2
    html = m.compare_html("generations", m.key("generations", rows.iloc[0]), "ppo β=0.05 s0 (default)")
    assert html.count("wb-sample") == 2, "side by side: the same prompt and sample under the other run"


def test_tokens_are_coloured_by_their_log_ratio(smollm_tokenizer):
    ids = smollm_tokenizer("a <script> b", add_special_tokens=False)["input_ids"]
    out = widgets.token_html(smollm_tokenizer, ids, [1.0] + [-0.5] * (len(ids) - 1))
    assert out.count('class="wb-token"') == len(ids)
    assert "rgba(31,119,180,1.00)" in out and "rgba(214,39,40,0.50)" in out  # + blue, − red, opacity ∝ |value|
    assert "<script>" not in out and "&lt;" in out


def test_drift_over_training_from_logged_samples(runs):
    m = widgets.InspectorModel(runs)
    d = m.drift("ppo β=0.05 s0 (default)")
    assert list(d["iteration"]) == [0, 1, 2] and list(d["score"]) == [1.0, 2.0, 3.0]
    assert m.drift("dpo β=0.1 s0 (default)").empty


def test_the_widget_updates_in_place(runs):
    ins = widgets.Inspector(runs, page_size=10)
    scatter = ins.scatter
    assert len(ins.scatter.data[0].x) == 80 and ins.page_label.value.startswith("page 1 / 8")
    assert ins.filter.value == "all" and ins.sort.value == "margin"
    ins._turn(+1)
    assert ins.page_label.value.startswith("page 2 / 8")
    ins.view.value = "generations"
    assert ins.scatter is scatter and ins.scatter.layout.xaxis.title.text == "kl"  # restyled, not rebuilt
    ins._on_select(ins.scatter.data[0], SimpleNamespace(point_inds=[3]))
    assert 'class="wb-token"' in ins.detail.value and ins.model.selected
    ins.filter.value = "selected"
    assert "1 samples" in ins.page_label.value


# ----------------------------------------------------------------------------------------------------------
# A real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter_env(home: Path) -> dict[str, str]:
    """JupyterLab in a state of its own, whatever the machine's home holds: on a first launch (a fresh CI machine)
    JupyterLab asks which kernel to start ("Select Kernel") after the first click, and accepting it replaces the
    kernel under a running notebook. A user setting starts the notebook's own kernel instead, as the box "Always
    start the preferred kernel" would; the news prompt is answered "never" (the test machine is offline)."""
    settings = home / "settings"
    for plugin, values in {"notebook-extension/tracker": {"autoStartDefaultKernel": True},
                           "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        f = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    dirs = {"JUPYTERLAB_SETTINGS_DIR": settings, "JUPYTERLAB_WORKSPACES_DIR": home / "workspaces",
            "JUPYTER_CONFIG_DIR": home / "config", "JUPYTER_RUNTIME_DIR": home / "runtime", "IPYTHONDIR": home / "ipython"}
    return {**os.environ, **{k: str(v) for k, v in dirs.items()}}


def _dismiss_dialogs(page, seen: list[str]) -> None:
    """Accept any dialog JupyterLab has opened (take its default, as a person would) and remember what it said."""
    dialogs = page.locator(".jp-Dialog")
    for _ in range(3):
        if not dialogs.count():
            return
        seen.append(" ".join(dialogs.first.inner_text(timeout=5_000).split())[:200])
        accept = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
        if accept.count():
            accept.first.click(timeout=10_000)
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(500)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)


def _prompts(page) -> list[str]:
    return [t.strip() for t in page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]


def _run_all_cells(page, clicks: int = 5, timeout: float = 300) -> list[str]:
    """Run > Run All Cells, until every code cell has run. JupyterLab can drop the queued cells while it is still
    wiring the kernel up (seen on a first launch: the first cell runs, the others go back to "[ ]" with the kernel
    idle), and a dialog can open meanwhile: so while nothing runs and some cell has not run, accept any dialog and
    click again. Returns the dialogs seen."""
    seen: list[str] = []
    clicked, deadline = 0.0, time.time() + timeout
    for _ in range(clicks):
        _dismiss_dialogs(page, seen)
        page.click(".lm-MenuBar-itemLabel:text-is('Run')", timeout=10_000)
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')", timeout=10_000)
        clicked = time.time()
        while time.time() < deadline:
            prompts = _prompts(page)
            if all(p[1:-2].isdigit() for p in prompts):
                return seen
            busy = "[*]:" in prompts or page.locator(".jp-Notebook-ExecutionIndicator[data-status='busy']").count() > 0
            if not busy and time.time() - clicked > 10:
                break  # nothing runs, something has not run: click again
            page.wait_for_timeout(500)
    raise AssertionError(f"Run All Cells did not run the notebook ({clicks} clicks, {timeout:.0f} s); prompts "
                         f"{_prompts(page)}, dialogs seen: {seen}")


def test_inspector_notebook_renders_in_jupyterlab(runs, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no Chromium: scripts/setup.sh installs Debian's chromium (or set BROWSER_PATH)"
    nb = json.loads((REPO / "notebooks" / "06_inspector.ipynb").read_text())
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    params["source"] = [line.replace('"runs/main"', json.dumps(str(runs))) for line in params["source"]]
    root = tmp_path / "root"
    root.mkdir()
    (root / "inspector.ipynb").write_text(json.dumps(nb))
    port, token = _free_port(), "wb-test-token"
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "jupyterlab.log"  # the server's log, kept for a failure's reader
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
             "--allow-root"], env=_jupyter_env(tmp_path / "jupyter"),
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    seen, failure = [], None
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, f"JupyterLab did not start; see {log}"
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            try:
                page.goto(f"http://127.0.0.1:{port}/lab/tree/inspector.ipynb?token={token}")
                page.wait_for_selector(".jp-Notebook", timeout=60_000)
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
                seen = _run_all_cells(page)
                page.wait_for_selector(".wb-table tr", timeout=120_000)
                page.wait_for_selector(".js-plotly-plot", timeout=60_000)
                page.locator(".wb-sample-select select").select_option(index=0)  # pick a sample: its tokens are drawn in colour
                page.wait_for_selector(".wb-token", timeout=30_000)
                rows = page.locator(".wb-table tbody tr").count()
                tokens = page.locator(".wb-token").count()
                page.locator(".wb-tokens").first.scroll_into_view_if_needed()
                page.screenshot(path=str(ARTIFACTS / "inspector-sample.png"))  # scatter and coloured tokens
            except Exception as e:  # say what the notebook showed: prompts, errors, dialogs
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
                failure = (f"{type(e).__name__}: {str(e)[:300]}\nprompts {_prompts(page)}; dialogs seen {seen}; "
                           f"stderr outputs {[t[-500:] for t in errors]}; screenshot and server log in {ARTIFACTS}")
            finally:  # the screenshot is kept whatever happened: test-artifacts/inspector.png
                page.screenshot(path=str(ARTIFACTS / "inspector.png"), full_page=True)
                browser.close()
        assert failure is None, failure
        assert rows == 25 and tokens > 0
    finally:  # the server stops with the test, whatever happened
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_the_reward_models_are_found_by_the_evaluation_not_by_their_names(tmp_path, smollm_tokenizer):
    """Which reward run is the proxy and which the gold comes from the policies' evaluation config, whatever the
    reward runs are named."""
    ids = smollm_tokenizer("yes", add_special_tokens=False)["input_ids"]
    pairs = [{"id": f"p{i}", "chosen_reward": 0.0, "rejected_reward": 0.0, "margin": 0.0, "correct": False,
              "chosen_tokens": 1, "rejected_tokens": 1, "chosen_token_ids": ids, "rejected_token_ids": ids,
              "chosen_length": 1, "rejected_length": 1, "length_rule": 0.5, "chosen_token_logratio": [0.0],
              "rejected_token_logratio": [0.0], "prompt": []} for i in range(4)]
    judge_a = _run(tmp_path, "reward", 0, [{"id": f"p{i}", "margin": 1.0} for i in range(4)], [], name="first")
    judge_b = _run(tmp_path, "reward", 1, [{"id": f"p{i}", "margin": -2.0} for i in range(4)], [], name="second")
    pol = _run(tmp_path, "dpo", 0, pairs, [])
    # the policy was evaluated with the second as the proxy and the first as the gold
    (pol / "eval" / "default" / "config.json").write_text(json.dumps(
        {"proxy_reward_model": str(judge_b), "gold_reward_model": str(judge_a)}))
    m = widgets.InspectorModel(tmp_path)
    assert (m.pairs["rm_margin"] == -2.0).all() and (m.pairs["gold_margin"] == 1.0).all()


def test_online_pairs_are_shown_by_round(tmp_path, smollm_tokenizer):
    """An online DPO run's training pairs (records/online_pairs.jsonl) in the "online" view: each with its round and
    label gap, the ties filter, the sample view naming the round, and the widget offering the view."""
    ids = smollm_tokenizer("Sure, here is a kind answer.", add_special_tokens=False)["input_ids"]
    prompt = [{"role": "user", "content": "Help?"}]
    pairs = [{"id": f"p{i}", "chosen_reward": 0.1, "rejected_reward": 0.0, "margin": 0.1, "correct": True,
              "chosen_tokens": len(ids), "rejected_tokens": 2, "chosen_token_ids": ids, "rejected_token_ids": ids[:2],
              "chosen_length": len(ids), "rejected_length": 2, "length_rule": 1.0, "prompt": prompt,
              "chosen_token_logratio": [0.0] * len(ids), "rejected_token_logratio": [0.0, 0.0]} for i in range(4)]
    gens = [{"id": f"q{i}", "sample": 0, "prompt": prompt, "completion": "x", "gold_score": 0.0, "score": 0.0, "kl": 0.1,
             "response_tokens": len(ids), "ended": True, "completion_token_ids": ids,
             "token_logratio": [0.0] * len(ids)} for i in range(4)]
    path = _run(tmp_path, "online-dpo", 0, pairs, gens)
    online = [{"round": r, "id": f"q{i}", "prompt": prompt, "chosen": "Sure.", "rejected": "No.",
               "chosen_label": 1.0 + r + i, "rejected_label": 1.0 + r, "chosen_kl": 0.2 * r, "rejected_kl": 0.1 * r,
               "chosen_token_ids": ids, "rejected_token_ids": ids[:2]} for r in (1, 2, 3) for i in range(1, 5)]
    (path / "records").mkdir()
    (path / "records" / "online_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in online))
    m = widgets.InspectorModel(tmp_path)
    (label,) = m.paths
    rows = m.rows("online", sort="label_gap", descending=False)
    assert len(rows) == 12 and sorted(set(rows["round"])) == [1, 2, 3]
    assert (rows["label_gap"] == rows["chosen_label"] - rows["rejected_label"]).all() and rows["label_gap"].iloc[0] == 1
    ties = m.rows("online", filter_name="ties kept out: smallest label gaps (bottom 10%)")
    assert set(ties["label_gap"]) == {1.0}  # the smallest gap of each round
    page = m.sample_html("online", (label, "q2", 3))
    assert "round 3" in page and page.count('class="wb-token"') == len(ids) + 2 and "label 6" in page
    ins = widgets.Inspector(tmp_path)
    assert "online" in ins.view.options
    ins.view.value = "online"
    assert "<th>round</th>" in ins.table.value and ins.scatter.layout.xaxis.title.text == "round"
