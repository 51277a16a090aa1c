"""The memory viewer (`/ui/sessions/{id}`) of `optical-memory serve`, in headless Chromium.

Debian's chromium and chromium-driver (scripts/setup.sh installs them for the test extras)
are driven by Selenium with explicit paths: no browser or driver is ever downloaded."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from optical_memory.apps.server import BackgroundServer, create_app, hash_key
from optical_memory.apps.viewer import render
from optical_memory.memory import OpticalMemory

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "viewer-key"


@pytest.fixture(scope="module")
def viewer(tmp_path_factory, conversation):
    # DeepSeek-OCR's 8192-position window: most pages are images, the newest may be text
    memory = OpticalMemory(tmp_path_factory.mktemp("viewer") / "memory.sqlite3")
    memory.extend("acme/viewed", conversation(320))
    app = create_app(memory, keys={hash_key(KEY): "acme", hash_key("other"): "globex"})
    with BackgroundServer(app) as server:
        server.memory = memory
        yield server
    memory.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {DRIVER}): "
                    "apt-get install chromium chromium-driver (scripts/setup.sh does for tests)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic",
                 "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_viewer_page_in_headless_chromium(viewer, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{viewer.url}/ui/sessions/viewed?key={KEY}")
    assert "key=" not in browser.current_url  # the key went into a cookie
    assert browser.find_element(By.TAG_NAME, "h1").text == "Memory of session viewed"
    plan = viewer.memory.plan("acme/viewed").to_dict()
    pages = plan["pages"]
    assert len(pages) >= 5
    # thumbnails grouped by tier: one section per tier in use, every page once
    sections = browser.find_elements(By.CSS_SELECTOR, "#tiers section.tier")
    tiers = [s.get_attribute("data-tier") for s in sections]
    assert tiers == list(dict.fromkeys(t for t in tiers))
    assert sorted(tiers) == sorted({p["mode"] or "out" for p in pages})
    assert len(tiers) >= 2
    figures = browser.find_elements(By.CSS_SELECTOR, "figure.page")
    assert sorted(int(f.get_attribute("data-page")) for f in figures) == [
        p["index"] for p in pages
    ]
    # every thumbnail loads
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script(
            "return Array.from(document.images).every(i => i.complete)"))
    widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.thumb')).map(i => i.naturalWidth)")
    assert len(widths) == len(pages) and all(w > 0 for w in widths), widths
    # the chart, the plan table, the pages table
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg#tokens-by-age g.bar")) == len(pages) + 1
    rows = browser.find_elements(By.CSS_SELECTOR, "#plan-table tbody tr")
    assert [r.get_attribute("data-tier") for r in rows] == [r["tier"] for r in plan["tiers"]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pages-table tbody tr")) == len(pages)
    # hover: the page's turns and its expected precision
    figure = figures[0]
    tip = figure.find_element(By.CSS_SELECTOR, ".tip")
    assert not tip.is_displayed()
    ActionChains(browser).move_to_element(figure).perform()
    WebDriverWait(browser, 10).until(lambda d: tip.is_displayed())
    first = pages[0]
    assert "expected precision" in tip.text
    assert f"turns {first['first_turn'] + 1}-{first['last_turn'] + 1}" in tip.text
    assert "[" + str(first["first_turn"]) + "]" in tip.text  # a turn's own words
    shot = tmp_path / "viewer.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
    # the index lists the session
    browser.get(f"{viewer.url}/ui")
    links = browser.find_elements(By.CSS_SELECTOR, "#sessions a")
    assert [a.text for a in links] == ["viewed"]


def test_viewer_needs_the_tenants_key(viewer):
    assert httpx.get(f"{viewer.url}/ui/sessions/viewed").status_code == 401
    other = httpx.get(f"{viewer.url}/ui/sessions/viewed", headers={"Authorization": "Bearer other"})
    assert other.status_code == 404
    mine = httpx.get(f"{viewer.url}/ui/sessions/viewed", headers={"Authorization": f"Bearer {KEY}"})
    assert mine.status_code == 200 and mine.headers["content-type"].startswith("text/html")
    assert "<script" not in mine.text  # server-rendered, no JavaScript


def test_render_takes_precision_when_present_and_text_pages():
    now = time.time()
    base = {"sealed": True, "age": 1.0, "content_hash": "h", "newest_time": now}
    plan = {
        "turns": 9, "window": 8192, "total": 900, "history_tokens": 2000, "vision_tokens": 184,
        "text_tokens": 50,
        "tiers": [{"tier": "tiny", "pages": 1, "turns": 3, "text_tokens": 600,
                   "context_tokens": 73, "ratio": 8.2}],
        "pages": [
            {**base, "index": 0, "first_turn": 0, "last_turn": 2, "text_tokens": 600,
             "mode": "tiny", "vision_tokens": 73},  # no precision (an older plan)
            {**base, "index": 1, "first_turn": 3, "last_turn": 5, "text_tokens": 500,
             "mode": "text", "vision_tokens": 0, "precision": 1.0},
            {**base, "index": 2, "first_turn": 6, "last_turn": 7, "text_tokens": 400,
             "mode": None, "vision_tokens": 0, "precision": 0.0},
            {**base, "index": 3, "first_turn": 8, "last_turn": 8, "text_tokens": 90,
             "mode": "small", "vision_tokens": 111, "precision": 0.873},
        ],
    }

    class T:
        def __init__(self, i):
            self.index, self.role, self.content = i, "user", f"turn <{i}> & more"

    html = render("s<1>", plan, [T(i) for i in range(9)])
    assert html.count('<section class="tier') == 4
    order = [html.index(f'data-tier="{t}"') for t in ("small", "tiny", "text", "out")]
    assert order == sorted(order)
    assert "not estimated" in html and "100%" in html and "87%" in html and "0%" in html
    assert "turn &lt;4&gt; &amp; more" in html and "s&lt;1&gt;" in html
    assert "tier=tiny&amp;width=" in html and "tier=full&amp;width=" in html
