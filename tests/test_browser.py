"""The course as a learner sees it: JupyterLab on loopback, driven in headless Chromium by Playwright.

For each chapter below, a copy of its solution notebook (outputs cleared, so everything on screen comes from this
run) is opened in JupyterLab and run with the menu's Run > Run All Cells. Then the test asserts what a learner
should see: every plotly figure drawn (an SVG with a title, labelled axes and data in it, not an empty div), the
circuitsvis attention view rendered, the ipywidgets slider changing its output when moved, and the pass line of
every check cell it ran. Screenshots go to test-artifacts/browser/ (WORKBOOK_ARTIFACTS overrides the folder).

Chapter 01 runs as a slice: its first part (everything before the corpus work) and the slider cell, which needs
only that part. The whole chapter takes five minutes in the browser and shows no kind of output the slice does not;
its every cell is executed, compared and graded by the solution-notebook test.

Needs Debian's `chromium` (CI installs it; `apt-get install chromium`); without it the test is skipped locally
and fails in CI. Offline: JupyterLab's news and update checks are off and Chromium makes no background requests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from utils.checks import chapter_exercises
from utils.course.notebooks import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("WORKBOOK_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
# The waits follow the notebook's progress, not the clock: a slow (or loaded) machine makes the test slower,
# not red. It fails only when nothing moves: no cell finished for STALL_S while cells are still pending.
STALL_S = 600  # the grader's limit for one cell
START_S = 600  # for JupyterLab to open the notebook and start its kernel
# What each chapter must show; together they cover every kind of output the course uses.
# "slice": (the first code cell to leave out, the one later code cell to run after the part kept), each named by
# how its source starts.
CHAPTERS = {
    "00_orientation": {"plots": True, "attention_view": True, "slider": None, "slice": None},
    "01_logit_lens": {"plots": True, "attention_view": False, "slider": "layer",
                      "slice": ("corpus_tokens = corpus_token_batches(", "view_prompts = [")},
}
CHECK_CALL = re.compile(r"^check\.(\w+)\(", re.MULTILINE)
# Chromium as root in a container, with no network: no sandbox, no GPU, and none of its background requests.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.slow

if CHROMIUM is None and os.environ.get("CI"):
    pytest.fail("CI must run the browser test: install Debian's chromium (.ci/run does).", pytrace=False)
if CHROMIUM is None:
    pytest.skip("the browser test needs Debian's chromium (apt-get install chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements.txt (playwright)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on loopback, serving a scratch folder with copies of the chapters, isolated from the user's
    Jupyter configuration. Yields the base URL and token."""
    work = tmp_path_factory.mktemp("lab")
    notebooks, config = work / "notebooks", work / "jupyter"
    notebooks.mkdir()
    for name, expect in CHAPTERS.items():
        nb = nbformat.read(ROOT / "solutions" / f"{name}.ipynb", as_version=4)
        if expect["slice"]:
            nb.cells = _slice(nb.cells, *expect["slice"])
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, notebooks / f"{name}.ipynb")
    settings = config / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Render every cell (the default virtual scrolling leaves off-screen outputs unrendered).
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    notifications = config / "settings" / "@jupyterlab" / "apputils-extension"
    notifications.mkdir(parents=True)  # no "Would you like to get notified about Jupyter news?" (offline)
    (notifications / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (config / "jupyter_server_config.json").write_text(json.dumps({"LabApp": {
        "news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
        "expose_app_in_browser": True, "user_settings_dir": str(config / "settings"),
        "workspaces_dir": str(config / "workspaces")}}))
    port, token = _free_port(), "workbook-browser-test"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(work / "data"),
           "JUPYTER_RUNTIME_DIR": str(work / "runtime"), "IPYTHONDIR": str(work / "ipython"),
           "WORKBOOK_ROOT": str(ROOT)}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={notebooks}"]
    if os.getuid() == 0:
        command.append("--allow-root")
    log = (work / "jupyterlab.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(work / 'jupyterlab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, token, notebooks
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _start_index(cells, start: str) -> int:
    found = [i for i, cell in enumerate(cells) if cell.cell_type == "code" and cell.source.startswith(start)]
    if len(found) != 1:  # the chapter changed: say so instead of silently testing another slice
        pytest.fail(f"the browser test's slice expects one code cell starting with {start!r}, found {len(found)}")
    return found[0]


def _slice(cells, leave_out_from: str, keep_from: str) -> list:
    """The cells before the code cell `leave_out_from`, then the code cell `keep_from` alone."""
    first, again = _start_index(cells, leave_out_from), _start_index(cells, keep_from)
    assert first < again, (leave_out_from, keep_from)
    return cells[:first] + cells[again:again + 1]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# JavaScript run in the page: the open notebook's model, through the app JupyterLab exposes as window.jupyterapp.
NOTEBOOK_STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    const cells = panel.content.widgets.filter(cell => cell.model.type === 'code');
    const outputs = cells.map(cell => cell.model.outputs.toJSON());
    return {
        kernel: kernel ? kernel.status : 'none',
        pending: cells.filter(cell => cell.model.executionCount === null || cell.promptNode.textContent.includes('*')).length,
        errors: outputs.flat().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
        plotly: outputs.flat().filter(o => o.data && o.data['application/vnd.plotly.v1+json']).length,
    };
}"""


def _run_all_cells(page) -> dict:
    """Run > Run All Cells from the menu bar, then wait until every code cell has run and the kernel is idle,
    for as long as cells keep finishing (at most STALL_S between two of them)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    last_pending, last_change = None, time.monotonic()
    while True:
        state = page.evaluate(NOTEBOOK_STATE)
        if state["errors"] or (state["pending"] == 0 and state["kernel"] == "idle"):
            return state
        if state["pending"] != last_pending:
            last_pending, last_change = state["pending"], time.monotonic()
        elif time.monotonic() - last_change > STALL_S:
            pytest.fail(f"no cell finished for {STALL_S} s ({state['pending']} still pending, kernel "
                        f"{state['kernel']}): {state}")
        time.sleep(1)


def _wait_until_idle(page, timeout_s: float = STALL_S) -> None:
    """After an interaction that runs code in the kernel (a slider), wait for the kernel to finish it."""
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status "
                           "=== 'idle'", timeout=timeout_s * 1000, polling=500)


@pytest.mark.parametrize("name", list(CHAPTERS))
def test_chapter_in_jupyterlab(lab, browser, name):
    base, token, notebooks = lab
    expect = CHAPTERS[name]
    shots = ARTIFACTS / name
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(START_S * 1000)  # clicks and locators wait as long as a slow machine needs
    try:
        # A workspace of its own, reset, so the page shows this notebook only (not the previous test's tab).
        page.goto(f"{base}/lab/workspaces/{name}/tree/{name}.ipynb?reset&token={token}", timeout=START_S * 1000)
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                               "window.jupyterapp.shell.currentWidget.sessionContext && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                               timeout=START_S * 1000, polling=500)
        page.screenshot(path=shots / "opened.png")
        panel = page.locator(f"[id='{page.evaluate('() => window.jupyterapp.shell.currentWidget.id')}']")
        assert panel.locator(".jp-Notebook").count() == 1
        state = _run_all_cells(page)
        page.screenshot(path=shots / "finished.png")
        assert not state["errors"], f"{name}: cells raised errors in JupyterLab: {state['errors']}"

        _assert_check_cells_pass(panel, name, notebooks / f"{name}.ipynb")
        if expect["plots"]:
            _assert_plots_drawn(panel, state["plotly"], shots)
        if expect["attention_view"]:
            _assert_attention_view_rendered(page, panel, shots)
        if expect["slider"]:
            _assert_slider_changes_output(page, panel, expect["slider"], shots)
    finally:
        try:  # stop this notebook's kernel, so the next chapter has the cores to itself
            page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
        finally:
            page.close()


def _assert_check_cells_pass(panel, name: str, path: Path) -> None:
    chapter = name[:2]
    text = panel.locator(".jp-Notebook").inner_text()
    passes = set(re.findall(r"✅ Exercise (\d+\.\d+)", text))
    exercises = chapter_exercises(chapter)
    called = {match for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
              for match in CHECK_CALL.findall(cell.source)}
    unknown = called - set(exercises)
    assert not unknown, f"check cells call {sorted(unknown)}, which chapter {chapter} does not register"
    expected = {exercises[key].number for key in called}
    assert expected, f"the notebook run in the browser has no check cells (chapter {chapter})"
    assert passes == expected, f"pass lines shown for {sorted(passes)}, expected {sorted(expected)}"
    assert "❌" not in text, "a check cell shows a failure"


def _assert_plots_drawn(panel, n_plotly_outputs: int, shots: Path) -> None:
    assert n_plotly_outputs > 0, "the notebook produced no plotly figure"
    figures = panel.locator(".jp-OutputArea .js-plotly-plot")
    assert figures.count() == n_plotly_outputs, f"{n_plotly_outputs} figures sent, {figures.count()} drawn"
    for index in range(figures.count()):
        figure = figures.nth(index)
        figure.scroll_into_view_if_needed()
        box = figure.bounding_box()
        assert box and box["width"] > 200 and box["height"] > 200, f"figure {index} is {box}"
        title = figure.locator(".gtitle").all_text_contents()
        axes = figure.locator(".xtitle").all_text_contents() + figure.locator(".ytitle").all_text_contents()
        assert title and title[0].strip(), f"figure {index} has no title"
        assert len([a for a in axes if a.strip()]) >= 2, f"figure {index} ({title[0]!r}) lacks axis labels: {axes}"
        # Data: a scatter trace's path, or a heatmap's image, inside the plot area.
        drawn = figure.locator(".scatterlayer .trace path.js-line, .heatmaplayer image, .hm image").count()
        assert drawn > 0, f"figure {index} ({title[0]!r}) has axes but no data drawn"
        if index < 3:
            figure.screenshot(path=shots / f"figure_{index}.png")


def _assert_attention_view_rendered(page, panel, shots: Path) -> None:
    views = panel.locator(".jp-OutputArea [id^='circuits-vis']")
    assert views.count() >= 1, "no circuitsvis output"
    view = views.first
    view.scroll_into_view_if_needed()
    page.wait_for_function("(el) => el.querySelectorAll('*').length > 20 && el.getBoundingClientRect().height > 100",
                           arg=view.element_handle(), timeout=STALL_S * 1000, polling=500)
    view.screenshot(path=shots / "attention_view.png")


def _assert_slider_changes_output(page, panel, description: str, shots: Path) -> None:
    # `has=` takes a locator relative to the element it filters, so these two are built from `page`.
    labelled = page.locator(".widget-slider", has=page.locator("label", has_text=description))
    widget = panel.locator(".widget-interact", has=labelled).first
    slider = widget.locator(".widget-slider", has=page.locator("label", has_text=description)).first
    slider.scroll_into_view_if_needed()
    output = widget.locator(".widget-output")
    before = output.inner_text()
    readout = slider.locator(".widget-readout").inner_text().strip()
    widget.screenshot(path=shots / "slider_before.png")
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    # The slider re-runs the view in the kernel: wait for the output to change, as long as that takes.
    page.wait_for_function("([el, old]) => el.innerText !== old && el.innerText.trim().length > 0",
                           arg=[output.element_handle(), before], timeout=STALL_S * 1000, polling=500)
    _wait_until_idle(page)
    after = output.inner_text()
    widget.screenshot(path=shots / "slider_after.png")
    new_readout = slider.locator(".widget-readout").inner_text().strip()
    assert int(new_readout) == int(readout) + 1, (readout, new_readout)
    assert f"layer {readout}:" in before and f"layer {new_readout}:" in after, (before[:200], after[:200])
