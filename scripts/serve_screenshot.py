"""Screenshot of the scoring page (docs/serve-page.png) with headless Chromium.

Drives a running ``phi4mm-lora serve`` like a user: types the sentence, uploads the
recording, presses Score and waits for the result. With ``--given-answer APA MDD`` the page
then shows the result that the server's own ``feedback()`` makes from those two raw model
answers - for a picture of the highlighting when the served model (e.g. the tiny random
test model) answers nothing readable. The README says which was used.

    phi4mm-lora serve --port 8000 &
    .venv/bin/python scripts/serve_screenshot.py http://127.0.0.1:8000 friend.webm "friend help bird pig" \\
        docs/serve-page.png --given-answer '{"accuracy": 6, "fluency": 8, "prosodic": 7, "total": 7}' \\
        '{"word_transcript": "frind hep bird pig", "phoneme_transcript": "F R IH N D HH EH P B ER D P IH G AH"}'

Needs Debian's ``chromium`` + ``chromium-driver`` (``make system-deps``) and ``selenium``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("audio", type=Path)
    ap.add_argument("sentence")
    ap.add_argument("out", type=Path)
    ap.add_argument("--given-answer", nargs=2, metavar=("APA", "MDD"), help="raw answers to show instead")
    ap.add_argument("--size", default="940,1215", help="browser window size (the viewport is ~145 px shorter)")
    args = ap.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--window-size={args.size}", f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(args.url.rstrip("/") + "/")
        driver.find_element(By.ID, "text").send_keys(args.sentence)
        driver.find_element(By.ID, "file").send_keys(str(args.audio.resolve()))
        driver.find_element(By.ID, "score").click()
        WebDriverWait(driver, 300).until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") == "done")
        if args.given_answer:
            from phi4mm_lora.evaluate.score import feedback
            from phi4mm_lora.serve.app import SCORE_LABELS

            health = httpx.get(args.url.rstrip("/") + "/health").json()
            result = {**feedback(args.audio.name, args.sentence, *args.given_answer), "score_labels": SCORE_LABELS,
                      "provenance": health["provenance"], "warnings": []}
            driver.execute_script("window.phi4mm.showResult(arguments[0])", result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
