"""The documentation site as a reader meets it: served on localhost, opened in headless Chromium.

``make docs`` builds ``site/``; this test serves it over HTTP on 127.0.0.1, visits every page
of the navigation and checks its title, that every image has loaded (``naturalWidth > 0``),
that nothing the page asked the server for is missing and nothing was asked of any other
host (the site works offline), and that the search box finds "basin". Screenshots of the four
method pages go to ``test-artifacts/docs/``. Without a built ``site/`` the test skips, unless
``TYCHE_REQUIRE_DOCS=1`` (set by ``.ci/run``, which builds it first).
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "site"
CHROMIUM = "/usr/bin/chromium"
METHODS = ("basin", "causal", "codebook", "interaction")
#: screenshots of the method pages land here (a CI artefact)
ARTIFACTS = Path(os.environ.get("TYCHE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "docs"
SITE_NAME = "Tyche"


def _skip_or_fail(message: str, env: str) -> None:
    if os.environ.get(env) == "1":
        pytest.fail(message)
    pytest.skip(message)


def _nav_pages(nav: list, titles: dict[str, str] | None = None) -> dict[str, str]:
    """``{source path: nav title}`` for every page of mkdocs.yml's ``nav`` (nested sections
    included)."""
    titles = {} if titles is None else titles
    for entry in nav:
        if isinstance(entry, str):
            titles[entry] = ""
            continue
        for title, value in entry.items():
            if isinstance(value, list):
                _nav_pages(value, titles)
            else:
                titles[value] = title
    return titles


def _url_of(source: str) -> str:
    """The site path of a docs page: ``api/basin.md`` -> ``api/basin.html`` (one file per
    page, ``use_directory_urls: false``, so the site also reads from disk)."""
    return source.removesuffix(".md") + ".html"


def _expected_title(source: str, nav_title: str) -> str:
    """Material's ``<title>``: the site name alone on the home page, else 'page - site'."""
    return SITE_NAME if source == "index.md" else f"{nav_title} - {SITE_NAME}"


@pytest.fixture(scope="module")
def site_pages() -> dict[str, str]:
    """``{url path: expected title}`` of every page in the navigation of the built site."""
    if not (SITE / "index.html").is_file():
        _skip_or_fail(f"no built site at {SITE}: run `make docs` (.ci/run does)",
                      "TYCHE_REQUIRE_DOCS")  # fmt: skip
    yaml = pytest.importorskip("yaml", reason="needs the [docs] extra (mkdocs brings PyYAML)")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    return {_url_of(src): _expected_title(src, title) for src, title in nav.items()}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The built site served over HTTP on 127.0.0.1 (a free port), as a base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    handler = functools.partial(Quiet, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by Playwright."""
    required = os.environ.get("TYCHE_REQUIRE_BROWSER") == "1"  # set by .ci/run
    if not Path(CHROMIUM).exists():
        _skip_or_fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)",
                      "TYCHE_REQUIRE_BROWSER")  # fmt: skip
    if required:
        from playwright import sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="needs the [app] extra")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            yield chromium
        finally:
            chromium.close()


def test_every_built_page_is_in_the_navigation(site_pages) -> None:
    """The nav covers the site: no page is built that a reader cannot reach from the menu."""
    built = {
        str(p.relative_to(SITE))
        for p in SITE.rglob("*.html")
        if p.relative_to(SITE).parts[0] not in ("assets", "search") and p.name != "404.html"
    }
    assert built == set(site_pages), (
        f"pages not in the nav: {sorted(built - set(site_pages))}; "
        f"nav pages not built: {sorted(set(site_pages) - built)}"
    )


def test_every_page_has_its_title_and_its_images(site_pages, server, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    missing: list[str] = []
    outside: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.url.startswith(server)
            and r.status >= 400 else None)  # fmt: skip
    page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:"))
            else outside.append(r.url))  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for path, title in sorted(site_pages.items()):
        page.goto(server + path, wait_until="load")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        if page.title() != title:
            problems.append(f"/{path}: title {page.title()!r}, expected {title!r}")
        if page.locator("article h1").count() != 1:
            problems.append(f"/{path}: {page.locator('article h1').count()} headings h1")
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])"
        )
        problems += [f"/{path}: image {src} did not load" for src, w in images if w <= 0]
        if path.removesuffix(".html") in METHODS:
            page.screenshot(path=str(ARTIFACTS / path.replace(".html", ".png")), full_page=True)
    page.close()
    assert not problems, "\n".join(problems)
    assert not missing, f"the site asked for files it does not have: {sorted(set(missing))}"
    assert not outside, f"the site asked the network for {sorted(set(outside))}; it must not"
    for method in METHODS:
        assert (ARTIFACTS / f"{method}.png").stat().st_size > 10_000


def test_the_search_box_finds_basin(site_pages, server, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server, wait_until="load")
    page.locator("input.md-search__input").click()
    page.keyboard.type("basin", delay=20)  # as a reader types: the search runs on each key
    results = page.locator(".md-search-result__item")
    results.first.wait_for(timeout=30_000)
    count = results.count()
    links = [a.get_attribute("href") or "" for a in page.locator(".md-search-result a").all()]
    page.close()
    assert count > 0
    assert any("basin.html" in href for href in links), f"no result links to basin.html: {links}"
