"""The report: results/report/index.html in headless Chromium, `snakemake --report`, and the table's marks.

The run's results (prepare -> train -> register -> aggregate) are made in this process through the same
CLI functions the rules call, then snakemake runs the two report rules, so that the report rules, their
captions and `snakemake --report` are exercised on real outputs.
"""
import base64
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from regbench.workflow import cli
from regbench.layout import run_dir
from regbench.report import figures
from regbench.report import page as report_page
from regbench.workflow.config import check_config, job_settings

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["identity", "voxelmorph"]
TINY = {
    "seed": 0,
    "torch_threads": 1,
    "datasets": {"embedded2d": {"n_train": 4, "n_val": 1, "n_test": 3}},
    "methods": {"identity": {}, "voxelmorph": {"overrides": {"iterations": 12, "batch_size": 2, "log_every": 2}}},
    "evaluation": {"runtime_repeats": 1},
    "tuned": {"embedded2d": "tuned.yaml"},
}
#: a lock file of two trials for VoxelMorph, as rule lock writes it (the run trains with its chosen values)
LOCK = {"dataset": "embedded2d", "made": {"commit": "0123456789ab", "date": "2026-01-01"},
        "budget": {"trials": 2, "fraction": 0.5, "max_fold_pct": 0.5, "seed": 0, "val_pairs": 1},
        "methods": {"voxelmorph": {
            "chosen": {"smoothness_weight": 0.7, "lr": 0.002}, "val_dice": 0.65, "val_fold_pct": 0.0,
            "status": "feasible", "trial": 1, "search_space": {"smoothness_weight": [0.01, 10.0, "log"],
                                                               "lr": [1e-5, 1e-2, "log"]},
            "trials": [{"trial": 0, "smoothness_weight": 3.0, "lr": 1e-4, "val_dice": 0.61, "val_fold_pct": 0.0,
                        "status": "feasible", "seconds": 1.0},
                       {"trial": 1, "smoothness_weight": 0.7, "lr": 0.002, "val_dice": 0.65, "val_fold_pct": 0.0,
                        "status": "feasible", "seconds": 1.0}]}}}
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run: results made in process, the report made by snakemake's report rules."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("report_run")
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (work / "tuned.yaml").write_text(yaml.safe_dump(LOCK))
    config = check_config(TINY, config_dir=work)
    prepared, results = work / "data" / "embedded2d" / "prepared", work / "results"

    def settings(method=None):
        return json.dumps(job_settings(config, "embedded2d", method))

    assert cli.main(["prepare", "--raw", str(work / "data" / "embedded2d" / "raw"), "--prepared", str(prepared),
                     "--settings", settings()]) == 0
    def out(method):
        return str(run_dir(results, "embedded2d", method, 0))

    assert cli.main(["train", "--prepared", str(prepared), "--out", out("voxelmorph"),
                     "--settings", settings("voxelmorph")]) == 0
    for method in METHODS:
        assert cli.main(["register", "--prepared", str(prepared), "--out", out(method), "--settings", settings(method)]) == 0
    assert cli.main(["aggregate", "--results", str(results), "--dataset", "embedded2d",
                     "--methods", ",".join(METHODS)]) == 0
    snakemake = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
                 "--configfile", str(work / "tiny.yaml")]
    made = subprocess.run(snakemake + ["--cores", "2"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-4000:]
    return {"work": work, "results": results, "snakemake": snakemake, "log": made.stderr}


def test_the_report_rules_write_every_figure_and_the_page(run):
    results = run["results"]
    for name in figures.FIGURES:
        assert (results / "report" / "embedded2d" / f"{name}.png").stat().st_size > 10_000, name
    page = (results / "report" / "index.html").read_text()
    # self-contained: figures embedded, nothing fetched from a network
    assert page.count("src='data:image/png;base64,") == len(figures.FIGURES)
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)
    assert "<script" not in page
    # provenance: the command that ran snakemake, the config hash, the commit and versions
    assert re.search(r"<code>snakemake [^<]*--configfile [^<]*--cores 2</code>", page)
    assert re.search(r"config hash</dt><dd><code>[0-9a-f]{12}</code>", page)
    assert "regbench commit" in page and "torch <code>" in page
    markdown = (results / "leaderboard.md").read_text()
    for method in METHODS:
        assert re.search(rf"^\| [^|]+ \| {method}( ◆)?( ○)?( †)? \|", markdown, re.M)


def test_the_report_says_what_was_tuned_and_the_run_trains_with_it(run):
    train = json.loads((run_dir(run["results"], "embedded2d", "voxelmorph", 0) / "train.json").read_text())
    assert (train["recipe"]["lr"], train["recipe"]["smoothness_weight"]) == (0.002, 0.7)
    facts = json.loads((run["results"] / "report" / "embedded2d" / "figures.json").read_text())
    tuned = facts["tuning"]["methods"]["voxelmorph"]
    assert tuned["chosen"] == {"smoothness_weight": 0.7, "lr": 0.002} and tuned["trials"] == 2
    assert tuned["overridden"] == [] and "identity" not in facts["tuning"]["methods"]
    page = (run["results"] / "report" / "index.html").read_text()
    assert "What was tuned, and what was chosen" in page and "smoothness_weight 0.7" in page
    assert "2 trials, 0.5 of each recipe's steps" in page and "tuned values" in page


def test_the_median_pair_is_registered_again_to_the_evaluated_scores(run):
    facts = json.loads((run["results"] / "report" / "embedded2d" / "figures.json").read_text())
    pairs = {m: pd.read_csv(run_dir(run["results"], "embedded2d", m, 0) / "pairs.csv") for m in METHODS}
    assert tuple(facts["median_pair"].values()) == figures.median_pair(pairs)
    assert sorted(facts["scores"]) == sorted(METHODS)
    for method, scores in facts["scores"].items():
        assert scores["recomputed"]["dice"] == pytest.approx(scores["evaluated"]["dice"], abs=1e-9), method
        assert scores["recomputed"]["fold_pct"] == pytest.approx(scores["evaluated"]["fold_pct"], abs=1e-9)


def test_snakemake_report_has_a_caption_for_every_figure_and_table(run):
    out = run["work"] / "snakemake_report.html"
    made = subprocess.run(run["snakemake"] + ["--report", str(out)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-4000:]
    text = out.read_text()
    for name in [*figures.FIGURES, "leaderboard", "index"]:
        caption = (ROOT / "workflow" / "report" / f"{name}.rst").read_text()
        # the caption's opening words, its Jinja placeholder filled with the dataset
        opening = " ".join(caption.split()[:8]).replace("{{ snakemake.wildcards.dataset }}", "embedded2d")
        assert opening.split("{{")[0] in re.sub(r"\s+", " ", text), name
    assert "{{ snakemake" not in text


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_loads_in_headless_chromium(run, tmp_path):
    page = run["results"] / "report" / "index.html"
    with Browser(CHROMIUM) as browser:
        state, screenshot = browser.open(page.as_uri(), width=1400)
    (tmp_path / "report.png").write_bytes(screenshot)
    shot_dir = os.environ.get("REGBENCH_SCREENSHOTS")
    if shot_dir:  # to look at the page by eye
        shutil.copy(tmp_path / "report.png", Path(shot_dir) / "report.png")
    assert state["images"] == len(figures.FIGURES)
    assert state["broken"] == [], f"images that did not load: {state['broken']}"
    assert browser.errors == [], f"console errors: {browser.errors}"
    assert sorted(state["methods"]) == sorted(METHODS)
    assert state["width"] <= 1400, "the page scrolls sideways"
    assert screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(screenshot) > 100_000


# ------------------------------------------------------------------------------------------------ the table

def _fake_results(folder: Path, dataset_id: str) -> None:
    """A leaderboard and its paired tests, written by hand: b is best on Dice, c is not significantly worse,
    a is; on folds a and c tie for the best."""
    (folder / dataset_id).mkdir(parents=True)
    board = pd.DataFrame({
        "method": ["b", "c", "a"], "dice_mean": [0.80, 0.79, 0.60], "dice_std": [0.02, 0.03, 0.05],
        "dsc30": [0.78, 0.76, 0.55], "fold_pct_mean": [0.5, 0.0, 0.0], "fold_pct_std": [0.1, 0.0, 0.0],
        "n_pairs": [10, 10, 10], "parameters": [100_000, 2_500_000, 0], "train_time_s": [30.0, 7200.0, np.nan],
        "l2r_rank": [1, 2, 3],
    })
    board.to_csv(folder / dataset_id / "leaderboard.csv", index=False)
    stats = pd.DataFrame({
        "metric": ["dice", "dice", "dice", "fold_pct", "fold_pct", "fold_pct"],
        "method_a": ["a", "a", "b", "a", "a", "b"], "method_b": ["b", "c", "c", "b", "c", "c"],
        "p_holm": [0.004, 0.01, 0.31, 0.002, 1.0, 0.002],
    })
    stats.to_csv(folder / dataset_id / "stats.csv", index=False)


def _cells(table_html: str, method: str) -> list[str]:
    """The metric and setup cells of a method's row (after its rank, name and class)."""
    row = re.search(rf"<th class='method' scope='row'><span class='dot' style='[^']*'></span>{method}</th>"
                    r"<td class='text class'>.*?</td>(.*?)</tr>", table_html).group(1)
    return re.findall(r"<td[^>]*>.*?</td>", row)


def test_significance_marks_and_bold_follow_stats_csv(tmp_path):
    _fake_results(tmp_path, "toy")
    section = report_page.DatasetSection(tmp_path, "toy", ["a", "b", "c"])
    assert [c[0] for c in section.columns()] == ["dice", "dsc30", "fold_pct"]
    table = section.tables_html()
    dice = {m: _cells(table, m)[0] for m in "abc"}
    assert "best" in dice["b"] and "◆" in dice["b"]
    assert "best" not in dice["c"] and "◆" in dice["c"] and "p = 0.31" in dice["c"]
    assert "◆" not in dice["a"] and "p = 0.004" in dice["a"]
    assert "0.800" in dice["b"] and "± 0.020" in dice["b"]
    folds = {m: _cells(table, m)[2] for m in "abc"}  # lower is better; a and c tie at 0
    assert "best" in folds["a"] and "best" in folds["c"] and "◆" not in folds["b"]
    assert "2.5 M" in table and "2 h" in table
    assert "published" not in table  # no published numbers for this dataset


def test_marks_compare_like_with_like(tmp_path):
    """b learned from labels, a and c from images only: c is the best of its class (bold, ◆) though b beats it
    overall, and a is significantly worse than c (p = 0.01), so it has no ◆."""
    _fake_results(tmp_path, "toy")
    board = pd.read_csv(tmp_path / "toy" / "leaderboard.csv").assign(supervision=["labels", "none", "none"])
    board.to_csv(tmp_path / "toy" / "leaderboard.csv", index=False)
    table = report_page.DatasetSection(tmp_path, "toy", ["a", "b", "c"]).tables_html()
    dice = {m: _cells(table, m)[0] for m in "abc"}
    assert "best" in dice["b"] and "best" in dice["c"]
    assert "◆" not in dice["a"] and "against c: Holm-adjusted p = 0.01" in dice["a"]
    assert "learns from" in table and ">none<" in table and ">labels<" in table


def test_a_row_no_better_than_no_registration_is_marked_with_its_p(tmp_path):
    _fake_results(tmp_path, "toy")
    board = pd.read_csv(tmp_path / "toy" / "leaderboard.csv")
    board["method"] = ["b", "c", "identity"]
    board["dice_p_vs_identity"] = [0.004, 0.2, np.nan]
    board["dice_beats_identity"] = [True, False, np.nan]
    board.to_csv(tmp_path / "toy" / "leaderboard.csv", index=False)
    table = report_page.DatasetSection(tmp_path, "toy", ["identity", "b", "c"]).tables_html()
    names = dict(re.findall(r"</span>(\w+)(.*?)</th>", table))
    assert names["b"] == "" and names["identity"] == ""
    assert "○" in names["c"] and "Holm-adjusted p = 0.2" in names["c"]
    assert "○: Dice not significantly higher than no registration" in table


def test_the_training_cell_names_the_iterations_each_seed_kept_on_val(tmp_path):
    _fake_results(tmp_path, "toy")
    (tmp_path / "toy" / "leaderboard.json").write_text(json.dumps({"seeds": {"a": [0], "b": [0, 1], "c": [0]}}))
    for seed, kept in ((0, 400), (1, 600)):
        folder = run_dir(tmp_path, "toy", "b", seed)
        folder.mkdir(parents=True)
        (folder / "train.json").write_text(json.dumps({"iterations": 600, "model_selection": {
            "criterion": "val_dice", "kept_iteration": kept, "scores": []}}))
    folder = run_dir(tmp_path, "toy", "c", 0)
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps({"iterations": 600, "model_selection": {
        "criterion": "last", "kept_iteration": 600, "scores": []}}))
    table = report_page.DatasetSection(tmp_path, "toy", ["a", "b", "c"]).tables_html()
    assert "600 it.</span><span class='s'>kept on val: 400, 600</span>" in _cells(table, "b")[4]
    assert "600 it.</span></td>" in _cells(table, "c")[4] and "kept" not in _cells(table, "c")[4]


def test_published_numbers_appear_where_the_dataset_and_method_match(tmp_path):
    _fake_results(tmp_path, "oasis")
    board = pd.read_csv(tmp_path / "oasis" / "leaderboard.csv")
    board["method"] = ["syn", "voxelmorph", "identity"]
    board.to_csv(tmp_path / "oasis" / "leaderboard.csv", index=False)
    stats = pd.read_csv(tmp_path / "oasis" / "stats.csv").replace({"a": "identity", "b": "syn", "c": "voxelmorph"})
    stats.to_csv(tmp_path / "oasis" / "stats.csv", index=False)
    table = report_page.DatasetSection(tmp_path, "oasis", ["identity", "syn", "voxelmorph"]).tables_html()
    assert "0.756" in _cells(table, "syn")[-1] and "ANTs" in _cells(table, "syn")[-1]
    assert "0.559" in _cells(table, "identity")[-1]
    assert _cells(table, "voxelmorph")[-1].endswith(">–</td>")  # Learn2Reg's table has no VoxelMorph
    assert "LapIRN" in table and "Learn2Reg OASIS test leaderboard (38 pairs)" in table


def test_a_method_missing_from_the_leaderboard_is_named(tmp_path):
    _fake_results(tmp_path, "toy")
    with pytest.raises(ValueError, match="no row for z"):
        report_page.DatasetSection(tmp_path, "toy", ["a", "z"])


# ------------------------------------------------------------------------------------------------ figures

def test_median_pair_is_the_lower_median_of_the_mean_dice():
    pairs = pd.DataFrame({"fixed": list("pqrs"), "moving": list("PQRS")})
    a = pairs.assign(dice=[0.1, 0.5, 0.9, 0.3])
    b = pairs.assign(dice=[0.3, 0.5, 0.7, 0.1])  # means: p 0.2, q 0.5, r 0.8, s 0.2
    assert figures.median_pair({"a": a, "b": b}) in {("p", "P"), ("s", "S")}
    assert figures.median_pair({"a": a.iloc[:3], "b": b.iloc[:3]}) == ("q", "Q")


@pytest.mark.parametrize("codes, expected", [
    ("LIA", {"slice_axis": 2, "row": 1, "col": 0, "flip_row": False, "flip_col": False}),  # FreeSurfer conformed
    ("RAS", {"slice_axis": 1, "row": 2, "col": 0, "flip_row": True, "flip_col": True}),
    (None, {"slice_axis": 2, "row": 0, "col": 1, "flip_row": False, "flip_col": False}),
])
def test_coronal_view_has_superior_up_and_the_right_on_the_left(codes, expected):
    axes = figures.display_axes(codes, 3)
    assert axes == expected
    shape = (4, 5, 6)
    display = figures.Display(shape, axes)
    index = np.indices(shape)
    view = {name: display.image(index[axis].astype(float)) for name, axis in (("row", axes["row"]), ("col", axes["col"]))}
    if codes == "RAS":  # superior (high index) at the top row, the patient's right (high index) in the left column
        assert view["row"][0, 0] == shape[2] - 1 and view["col"][0, 0] == shape[0] - 1
    # with u = 0 the grid lines sit on the view's own rows and columns
    lines = display.grid_lines(np.zeros((3, *shape)), every=2)
    height, width = display.image(np.zeros(shape)).shape
    assert len(lines) == len(range(1, height, 2)) + len(range(1, width, 2))
    np.testing.assert_allclose(lines[0], np.stack([np.full(width, 1.0), np.arange(width)], axis=1))


def test_grid_lines_follow_the_displacement():
    shape = (8, 10)
    u = np.zeros((2, *shape))
    u[0] += 1.5  # every point maps 1.5 voxels down the first axis (superior-inferior for "IL")
    display = figures.Display(shape, figures.display_axes("IL", 2))
    first_row = display.grid_lines(u, every=4)[0]
    np.testing.assert_allclose(first_row[:, 0], 2 + 1.5)


# ------------------------------------------------------------------------------------------------ Chromium

class Browser:
    """Headless Chromium driven through the DevTools protocol on a pipe (--remote-debugging-pipe: the
    browser reads commands on fd 3 and writes replies on fd 4), so no driver package is needed."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--remote-debugging-pipe"]

    def __init__(self, binary: str):
        self.binary, self.errors, self._events, self._buffer, self._id = binary, [], [], b"", 0

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix="regbench-chromium-")
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def onto_fds_3_and_4():
            a, b = os.dup(commands_read), os.dup(replies_write)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen([self.binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        pass_fds=(3, 4), preexec_fn=onto_fds_3_and_4, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        return self

    def __exit__(self, *exc):
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)
        shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, url: str, width: int) -> tuple[dict, bytes]:
        """Load ``url``; return what the page holds and a full-page PNG screenshot. Console errors, uncaught
        exceptions and failed loads are collected in ``self.errors``."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                          "mobile": False})
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")
        state = json.loads(self.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify({
            images: document.images.length,
            broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
            methods: Array.from(document.querySelectorAll('table.leaderboard tbody th.method')).map(e => e.textContent.replace('†', '').replace('○', '').trim()),
            width: document.documentElement.scrollWidth,
            height: document.documentElement.scrollHeight})"""})["result"]["value"])
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": 0, "width": width, "height": min(state["height"], 16000), "scale": 1}})
        for event in self._events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.errors.append((details.get("exception") or {}).get("description") or details.get("text"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.errors.append(params["entry"]["text"])
        return state, base64.b64decode(shot["data"])

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if getattr(self, "session", None) and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for index, seen in enumerate(self._events):
            if seen.get("method") == event:
                return self._events[index]
        while True:
            message = self._read(deadline)
            self._events.append(message)
            if message.get("method") == event:
                return message

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer")
            if select.select([self._replies], [], [], left)[0]:
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)
