"""A screenshot of the memory viewer (`/ui/sessions/{id}` of `optical-memory serve`).

The demo's 1000-turn conversation (`optical_memory.conversation`) is stored in a
temporary SQLite file, served on a free loopback port, and the viewer page is
opened in headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium; nothing is downloaded), planned for a question, and captured whole.

    python3 benchmarks/viewer_screenshot.py [--turns 1000] [--out benchmarks/results/serve_viewer.png]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path
from urllib.parse import quote

from common import RESULTS_DIR
from PIL import Image

QUESTION = "What did we decide about the launch budget?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--out", default=str(RESULTS_DIR / "serve_viewer.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2450, help="crop to this many pixels")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from optical_memory.apps.server import BackgroundServer, create_app
    from optical_memory.conversation import build_conversation
    from optical_memory.memory import OpticalMemory

    work = Path(tempfile.mkdtemp(prefix="viewer-"))
    memory = OpticalMemory(work / "memory.sqlite3")
    memory.extend("demo", build_conversation(args.turns))
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--window-size={args.width},900",
                 f"--user-data-dir={work / 'chromium'}"):
        options.add_argument(flag)
    with BackgroundServer(create_app(memory)) as server:
        driver = webdriver.Chrome(options=options,
                                  service=Service(executable_path="/usr/bin/chromedriver"))
        try:
            driver.get(f"{server.url}/ui/sessions/demo?query={quote(QUESTION)}")
            WebDriverWait(driver, 300).until(lambda d: d.execute_script(
                "return Array.from(document.images).every(i => i.complete && i.naturalWidth)"))
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(args.width, min(int(height) + 40, 6000))
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    memory.close()
    # the top of the page (tiers, chart, plan table), in 256 colours: a smaller file to keep
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, args.height)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256).save(args.out, optimize=True)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
