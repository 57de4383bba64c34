"""The HTML report opened in a real headless browser: its tables and plots are there and render.

Driver: Selenium with Debian's chromium and chromium-driver, installed beforehand by `bash scripts/test-services.sh
up` (scripts/headless-browser.sh; the README's test command and .ci/run do it). One WebDriver session answers every question this test asks of the page
loaded as a user opens it (file://): the DOM after load, the text the browser lays out, whether each <img> decoded
(`complete`, natural size, `HTMLImageElement.decode()`), the console's errors (the browser log) and every request
the page made (the DevTools performance log, which also lists requests that failed). `chromium --headless
--dump-dom` gives the DOM only, and a screenshot says nothing about which image failed or what was fetched.

Without that browser these tests skip, naming the step that installs it; under CI=true they fail instead.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import PNG_MAGIC, REPO, sweep  # noqa: F401  (sweep: the fixture of synthetic run records)

pytestmark = pytest.mark.slow  # installs a browser on first use

SCRIPT = REPO / "scripts" / "headless-browser.sh"


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser tests, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session, driven through chromedriver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    done = subprocess.run(["bash", str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        _unavailable(
            f"no headless browser ({done.stderr.strip()}): install it with `bash scripts/test-services.sh up` "
            "(needs root and apt-get)"
        )
    chromium, chromedriver = done.stdout.split()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: Chromium's sandbox refuses to run as root, which CI and containers are.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # Both paths given: Selenium Manager is not asked to download anything.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> dict:
    """Load `path` as a user opens it; what the browser made of it."""
    driver.get_log("browser"), driver.get_log("performance")  # drop what earlier pages left
    url = path.resolve().as_uri()
    driver.get(url)  # returns after the load event
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requests.append(message["params"]["request"]["url"])
    images = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        Promise.all([...document.images].map(async image => {
            const decoded = await image.decode().then(() => true, () => false);
            const box = image.getBoundingClientRect();
            return {alt: image.alt, complete: image.complete, decoded: decoded, natural: [image.naturalWidth,
                    image.naturalHeight], shown: [Math.round(box.width), Math.round(box.height)]};
        })).then(done);
    """)
    return {
        "url": url,
        # Cut: a failed data: image is logged with its whole address.
        "errors": [e["message"][:300] for e in driver.get_log("browser") if e["level"] == "SEVERE"],
        "requests": requests,
        "images": images,
        # Every URL the markup points at, and each style sheet's address (None: inline) and text.
        "references": driver.execute_script(
            "return [...document.querySelectorAll('[src],[href],[srcset],[data],[poster]')].flatMap(e => "
            "['src', 'href', 'srcset', 'data', 'poster'].filter(a => e.hasAttribute(a))"
            ".map(a => e.tagName.toLowerCase() + ' ' + a + '=' + e.getAttribute(a).slice(0, 40)))"
        ),
        "style_sheets": driver.execute_script(
            "return [...document.styleSheets].map(s => { let text = null; try { text = [...s.cssRules]"
            ".map(r => r.cssText).join(' '); } catch (e) {} return [s.href, text]; })"
        ),
    }


def problems(page: dict) -> list:
    """Everything that says the page did not load whole and self-contained; [] when it did."""
    found = [f"console error: {e}" for e in page["errors"]]
    found += [f"fetched: {url[:80]}" for url in page["requests"] if url != page["url"] and not url.startswith("data:")]
    found += [
        f"points outside the page: {ref}"
        for ref in page["references"]
        if not ref.split("=", 1)[1].startswith(("data:", "#"))
    ]
    found += [f"style sheet from {href}" for href, _ in page["style_sheets"] if href is not None]
    found += ["url() in a style sheet" for _, text in page["style_sheets"] if "url(" in (text or "")]
    for image in page["images"]:
        if not (image["complete"] and image["decoded"] and min(image["natural"]) > 0 and min(image["shown"]) > 0):
            found.append(f"image not rendered: {image}")
    return found


def png_size(data: bytes) -> list:
    """[width, height] from a PNG's IHDR chunk."""
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR"
    return list(struct.unpack(">II", data[16:24]))


def cells(driver, xpath: str) -> list:
    """The rendered text of a table's rows (header row first), cell by cell."""
    from selenium.webdriver.common.by import By

    (table,) = driver.find_elements(By.XPATH, xpath)
    return [
        [cell.text for cell in row.find_elements(By.XPATH, "./th|./td")]
        for row in table.find_elements(By.TAG_NAME, "tr")
    ]


def test_the_html_report_renders_its_tables_and_plots_in_a_browser(browser, sweep, tmp_path):  # noqa: F811
    root, _ = sweep
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "ptq.report", str(root), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    page = open_page(browser, out / "results.html")
    assert problems(page) == []
    assert browser.title == "Quantization results"

    # The results table of model "tiny": BF16, the variants in display order, the failed and the running one.
    table = cells(browser, "//h2[.='tiny']/following-sibling::table[1]")
    assert table[0] == [
        "benchmark",
        "metric",
        "bf16",
        "fp8@512",
        "fp8+kv_fp8@512",
        "int4_awq@128",
        "int4_awq@1024",
        "nvfp4@512 (failed)",
        "w4a8_awq@512 (running)",
    ]
    rows = {(row[0], row[1]): row[2:] for row in table[1:]}
    assert list(rows) == [
        ("arc_easy", "acc_norm"),
        ("hellaswag", "acc"),
        ("perplexity", "fidelity"),
        ("mean_kl_vs_bf16", "fidelity"),
        ("top1_agreement_vs_bf16", "fidelity"),
    ]
    assert rows[("arc_easy", "acc_norm")] == [
        "0.320 ± 0.010",
        "0.300 ± 0.010 (-0.020 n.s., 93.8%)",
        "",
        "0.280 ± 0.010 (-0.040, 87.5%)",
        "0.310 ± 0.010 (-0.010 n.s., 96.9%)",
        "",
        "",
    ]
    summary = {row[0]: row for row in cells(browser, "//h3[.='tiny: summary']/following-sibling::table[1]")[1:]}
    assert summary["nvfp4@512"][1] == "failed"
    assert summary["nvfp4@512"][-1] == "failed: torch.OutOfMemoryError: CUDA out of memory."
    assert summary["fp8@512"][1:3] == ["finished", "91.9% [84.8, 99.0]"]
    other = cells(browser, "//h2[.='other']/following-sibling::table[1]")
    assert other[0] == ["benchmark", "metric", "bf16", "fp8@256", "int8_sq@256"]

    # One decoded image per PNG the report wrote, each the size of its file.
    files = {p.name: png_size(p.read_bytes()) for p in out.glob("*.png")}
    assert len(files) >= 2
    shown = {image["alt"].replace(" ", "_") + ".png": image["natural"] for image in page["images"]}
    assert len(page["images"]) == len(files) and shown == files


def test_the_checks_see_a_broken_page(browser, tmp_path):
    """The checks above can fail: a page with a corrupt and a missing image, an outside style sheet and a script
    error is reported on every count."""
    corrupt = base64.b64encode(PNG_MAGIC + b"not an image").decode("ascii")
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html>\n<html><head><title>broken</title>"
        # Port 9 is one browsers refuse to contact: the request is made and fails at once, offline.
        '<link rel="stylesheet" href="http://127.0.0.1:9/style.css"></head><body>'
        f'<img alt="corrupt" src="data:image/png;base64,{corrupt}"><img alt="missing" src="plot.png">'
        '<script>throw new Error("boom")</script></body></html>'
    )
    found = problems(open_page(browser, page))
    assert any("Uncaught Error: boom" in p for p in found)
    assert "fetched: http://127.0.0.1:9/style.css" in found and any(
        p.endswith("/plot.png") for p in found if p.startswith("fetched: ")
    )
    assert "points outside the page: link href=http://127.0.0.1:9/style.css" in found
    assert "points outside the page: img src=plot.png" in found
    assert sum(p.startswith("image not rendered: {'alt': 'corrupt'") for p in found) == 1
    assert sum(p.startswith("image not rendered: {'alt': 'missing'") for p in found) == 1
