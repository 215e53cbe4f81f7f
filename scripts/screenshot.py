"""Screenshot of the running app with a shipped adapter, for the README (docs/app.png).

python app.py --port 7861 &
python scripts/screenshot.py --url http://127.0.0.1:7861 --adapter address --out docs/app.png
"""

from __future__ import annotations

import argparse
import shutil

BOTH_FINISHED = """() => ['#tuned-stats', '#base-stats'].every(
    s => document.querySelector(s) && document.querySelector(s).innerText.includes('finish'))"""


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--adapter", default="address")
    parser.add_argument("--example", type=int, default=0, help="which of the adapter's examples")
    parser.add_argument("--out", default="docs/app.png")
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(args.url + "/", wait_until="domcontentloaded")
        page.wait_for_selector("#run", timeout=120_000)
        page.get_by_label("Adapter", exact=True).click()
        page.get_by_role("option", name=args.adapter, exact=True).click()
        page.wait_for_selector(f"#adapter-card:has-text('{args.adapter}')")
        page.get_by_label("Examples").click()
        page.get_by_role("option").nth(args.example).click()
        page.wait_for_function("() => document.querySelector('#field-0 textarea').value.length")
        page.locator("#run").click()
        page.wait_for_function(BOTH_FINISHED, timeout=300_000)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
