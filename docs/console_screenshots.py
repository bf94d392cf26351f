#!/usr/bin/env python3
"""Take the screenshots of the web console in docs/console.md: ``docs/img/console-*.png``.

Start the demo first (``make run`` prints the console's URL), let it run a minute or two so the
jobs have history, then: ``.venv/bin/python docs/console_screenshots.py [--url URL] [--seed]``.
``--seed`` adds a few API jobs through ``/api/v1`` (a busy 02:00-style pile-up, a paused one, a
failing one) so the pages have something to show. Needs Debian's ``chromium`` and
``chromium-driver`` and the ``selenium`` package (dev extras).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

OUT = Path(__file__).resolve().parent / "img"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
)  # fmt: skip


def api(url: str, method: str, path: str, body: dict[str, object]) -> None:
    response = httpx.request(method, f"{url}/api/v1{path}", json=body, timeout=10)
    if response.status_code >= 400:
        print(f"{method} {path}: {response.status_code} {response.text[:200]}")


def seed(url: str) -> None:
    regions = ["eu", "us", "apac"]
    for i, region in enumerate(regions):
        spec = {"id": f"report-{region}", "task": "demo.number_sum", "cron": f"*/{5 + i} * * * *", "args": [i, 1]}
        api(url, "POST", "/jobs", {"spec": spec, "note": "seeded for the screenshots"})
    for i in range(12):
        spec = {"id": f"sync-shard-{i:02d}", "task": "demo.sleep", "cron": "*/10 * * * *", "args": [0.2]}
        api(url, "POST", "/jobs", {"spec": spec, "note": "one shard each"})
    api(url, "POST", "/jobs", {"spec": {"id": "ping-fast", "task": "demo.async_sleep", "interval": 5, "args": [0.05]}})
    broken = {"id": "invoice-export", "task": "demo.number_sum", "interval": 7, "args": ["eur", 1]}
    api(url, "POST", "/jobs", {"spec": broken, "note": "fails on purpose: a str plus an int"})
    api(url, "POST", "/jobs/report-apac/pause", {"note": "APAC warehouse migration until Friday"})
    for _ in range(3):
        api(url, "POST", "/jobs/demo-sum-every-minute/trigger", {"note": "re-run for the screenshots"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8765")
    parser.add_argument("--seed", action="store_true")
    parser.add_argument("--job", default="demo-heartbeat", help="the job page to take")
    args = parser.parse_args()
    if args.seed:
        seed(args.url)
        time.sleep(40)
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            for name, path, height in (
                ("overview", "/", 900),
                ("jobs", "/jobs", 1000),
                ("job", f"/jobs/{args.job}", 1500),
                ("timeline", "/timeline?minutes=60", 1100),
            ):
                driver.set_window_size(1280, height)
                driver.get(args.url + path)
                time.sleep(1.0)  # htmx and fonts settle; a screenshot, not a test
                driver.save_screenshot(str(OUT / f"console-{name}.png"))
                print(f"wrote {OUT / f'console-{name}.png'}")
            driver.set_window_size(390, 844)
            driver.get(args.url + "/")
            time.sleep(1.0)
            driver.save_screenshot(str(OUT / "console-phone.png"))
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
