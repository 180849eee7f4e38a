"""The Streamlit code browser: with Streamlit's AppTest, and in a real headless Chromium."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the code browser needs the [app] extra (streamlit)")

from tyche.cli.codebook_app import APP_FILE, CACHE_ENV, streamlit_command  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
#: screenshots of the browser test land here (a CI artefact)
ARTIFACTS = Path(
    os.environ.get("TYCHE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_tokenizer, tiny_texts) -> Path:
    from codebook_helpers import tiny_cb_model

    from tyche.codebook.cache import build_cache

    model = tiny_cb_model()
    model.tokenizer = tiny_tokenizer
    ids = tiny_tokenizer(" ".join(tiny_texts * 3), return_tensors="pt")["input_ids"][0]
    rows = ids[: (ids.numel() // 16) * 16].view(-1, 16)
    folder = tmp_path_factory.mktemp("app-cache")
    build_cache(
        model,
        rows,
        folder,
        provenance={"model_name": "tiny-neox", "data_name": "tiny_texts"},
        progress=False,
    )
    return folder


def test_app_with_apptest(cache_dir, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    at = AppTest.from_file(str(APP_FILE), default_timeout=120)
    at.run()
    assert not at.exception
    assert at.title[0].value == "Code browser"
    assert "tiny-neox" in at.caption[0].value
    # search
    at.text_input(key="pattern").input(r"\bking\b")
    at.slider(key="min_recall").set_value(0.0)
    at.button(key="search").click()
    at.run()
    assert not at.exception
    table = at.table[0].value
    assert len(table) > 0 and {"site", "code", "precision", "recall"} <= set(table.columns)
    assert (table["precision"].diff().dropna() <= 1e-9).all()  # best first
    # contexts of the best code
    best = table.iloc[0]
    at.selectbox(key="ctx_site").set_value(best["site"])
    at.run()
    if best["head"] != "":
        at.number_input(key="ctx_head").set_value(int(best["head"]))
    at.number_input(key="ctx_code").set_value(int(best["code"]))
    at.run()
    assert any("<mark>" in m.value for m in at.markdown)
    # token view and intervention run the cached model
    at.text_area(key="view_text").input("the king")
    at.button(key="view").click()
    at.run()
    assert not at.exception
    assert at.table[-1].value["token"].tolist() == ["'the'", "' king'"]
    at.text_input(key="iv_prompt").input("the king")
    at.button(key="iv_run").click()
    at.run()
    assert not at.exception
    texts = [m.value for m in at.markdown]
    assert any(t.startswith("**without:**") for t in texts)
    assert any(t.startswith("**with code forced:**") for t in texts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("streamlit did not come up")


def test_app_in_headless_chromium(cache_dir) -> None:
    required = os.environ.get("TYCHE_REQUIRE_BROWSER") == "1"  # set by .ci/run
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    if required:
        from playwright import sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="needs the [app] extra")
    port = _free_port()
    env = dict(os.environ, **{CACHE_ENV: str(cache_dir)})
    cmd = streamlit_command(cache_dir, port=port, headless=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, proc)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.get_by_text("Code browser").first.wait_for(timeout=60_000)
            box = page.get_by_label("regex")
            box.fill(r"\bking\b")
            box.press("Enter")
            page.get_by_role("button", name="Search").click()
            page.get_by_text("tokens match").first.wait_for(timeout=60_000)
            table = page.locator("table").first
            table.wait_for(timeout=60_000)
            header = table.locator("th").all_inner_texts()
            assert "precision" in header and "recall" in header
            rows = table.locator("tbody tr").count()
            assert rows > 0
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "codebook_app_search.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_tyche_stops_the_streamlit_server(cache_dir, sig, code, tmp_path) -> None:
    """``kill`` of the ``tyche codebook app`` process (not its group) stops its server too,
    and tyche exits with the conventional code (128 + the signal)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tyche", "codebook", "app", "--cache", str(cache_dir), "--port",
           str(port)]  # fmt: skip
    log = tmp_path / "app.log"  # a file, not a pipe: an orphaned server would hold a pipe open
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(port, proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1, children  # the streamlit server
        server = int(children[0])
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=30) == code, log.read_text()[-2000:]
        deadline = time.time() + 5
        while _alive(server) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(server), f"the streamlit server {server} outlived tyche"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session
        proc.wait(timeout=10)
