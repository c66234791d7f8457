"""The README's dashboard screenshot: log in to a running edge (`make demo KEEP=1 PORT=8800`) with
Debian's headless chromium, wait until the live timeline has `--intervals` heartbeats, and save
the whole page as a small PNG.

    .venv/bin/python scripts/dashboard_screenshot.py --url http://127.0.0.1:8800 \\
        --token-file runs/demo/admin.token --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the edge, e.g. http://127.0.0.1:8800")
    parser.add_argument("--token-file", required=True, help="the edge's admin token file")
    parser.add_argument("--out", default="docs/dashboard.png")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--intervals", type=int, default=30, help="heartbeats drawn before the shot")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={args.width},4000"):  # tall enough for the whole page; cropped below
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        driver.get(args.url.rstrip("/") + "/login")
        driver.find_element(By.ID, "token").send_keys(Path(args.token_file).read_text().strip())
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()

        def drawn(d):
            cards = d.find_elements(By.CSS_SELECTOR, ".timeline")
            return cards and int(cards[0].get_attribute("data-intervals") or 0) >= args.intervals

        started = time.monotonic()
        WebDriverWait(driver, args.timeout, poll_frequency=1).until(drawn)
        print(f"timeline drawn after {time.monotonic() - started:.0f} s", file=sys.stderr)
        time.sleep(1)
        height = int(driver.execute_script("return document.querySelector('main').getBoundingClientRect().bottom")) + 8
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        png = out.with_suffix(".raw.png")
        driver.save_screenshot(str(png))
    finally:
        driver.quit()
    image = cv2.imread(str(png))[:height]
    png.unlink()
    cv2.imwrite(str(out), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"{out}: {image.shape[1]}x{image.shape[0]}, {out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
