"""Dashboards in a real browser (headless Chromium driven by selenium): a hostile corpus and
hostile explanations run no script, log no console error, keep the layout, and the page draws.

Needs Debian's `chromium` and `chromium-driver` (scripts/setup.sh installs them as root) and the
`selenium` package (the `test` extra); skipped with a message only when they are missing."""
import io
import shutil
import tempfile
import time

import pytest

from test_dashboards import HOSTILE, FakeCache, FakeTokenizer, make_examples

from circuits.dashboards import render_dashboards

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,900", "--force-device-scale-factor=1"]
PWNED = "return window.__pwned === undefined && !document.querySelector('img,iframe,object,embed')"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    if not (CHROMIUM and DRIVER):
        pytest.skip("headless Chromium is not installed: run scripts/setup.sh as root, or "
                    "`apt-get install -y chromium chromium-driver`")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for f in FLAGS:
        opts.add_argument(f)
    profile = tempfile.mkdtemp(prefix="sae-dash-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(drv, path):
    drv.get_log("browser")                                          # drop earlier entries
    drv.get(path.resolve().as_uri())
    time.sleep(0.3)                                                  # let any (injected) handler fire


def problems(drv):
    """Console errors and warnings of the page (CSP violations are errors)."""
    return [e for e in drv.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")]


def no_alert(drv):
    from selenium.common.exceptions import NoAlertPresentException
    try:
        drv.switch_to.alert.text
    except NoAlertPresentException:
        return True
    return False


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    vocab = HOSTILE + ["<img src=x onerror=alert(1)>", "\ufffd"]
    tok = FakeTokenizer(vocab)
    bad = '<img src=x onerror="window.__pwned=1;alert(1)"></script><script>window.__pwned=1</script>\u202e'
    cache = FakeCache([make_examples("resid.0", f, len(vocab), n_top=8, n_bins=4, per_bin=3) for f in range(150)])
    expl = {("resid.0", f): {"explanation": bad + f" feature {f}", "scores": {"detection": f / 150}} for f in range(150)}
    pages = render_dashboards(None, None, cache, out, site="resid.0", explanations=expl, tokenizer=tok,
                              per_quantile=2, progress=False)
    return out, pages


def test_hostile_feature_page_runs_nothing_and_keeps_its_layout(browser, hostile_site):
    from PIL import Image

    out, pages = hostile_site
    open_page(browser, pages[3])
    assert browser.execute_script(PWNED)
    assert no_alert(browser)
    assert problems(browser) == []
    assert browser.execute_script("return document.scripts.length") == 0
    assert browser.execute_script(
        "return [...document.querySelectorAll('a')].every(a => !a.href.toLowerCase().startsWith('javascript:'))")
    rows = browser.find_elements("css selector", "#contexts .ctx")
    assert len(rows) == 8 + 4 * 2                                     # top 8 + 2 per quantile bin
    box = browser.find_element("id", "contexts")
    assert box.size["height"] > 16 * 10 and box.size["width"] > 400   # rows stacked, full width
    text = box.text
    assert "<script>window.__pwned=1</script>" in text and "\\u202eevil\\u202c" in text and "a\\x00b" in text
    assert "<img src=x onerror" in browser.find_element("id", "explanation").text
    # the contexts draw: non-white pixels, and orange highlights, where the contexts are
    browser.execute_script("arguments[0].scrollIntoView()", box)
    png = Image.open(io.BytesIO(box.screenshot_as_png)).convert("RGB")
    raw = png.tobytes()
    px = [tuple(raw[i:i + 3]) for i in range(0, len(raw), 3)]
    ink = sum(1 for r, g, b in px if r + g + b < 600) / len(px)
    orange = sum(1 for r, g, b in px if r > 200 and 90 < g < 230 and b < 150 and r - b > 80) / len(px)
    assert ink > 0.02 and orange > 0.005, (ink, orange)


def test_hostile_index_page_searches_sorts_and_runs_only_its_own_script(browser, hostile_site):
    out, _ = hostile_site
    open_page(browser, out / "index.html")
    assert browser.execute_script("return document.body.getAttribute('data-ready')") == "1"   # our script ran
    assert browser.execute_script(PWNED) and no_alert(browser)
    assert problems(browser) == []
    rows = browser.find_elements("css selector", "#rows tr")
    assert len(rows) == 100                                          # first page of 150
    assert "<img src=x onerror" in rows[0].text
    # sort by the detection score (descending on first click): feature 149 first
    head = {th.text.rstrip(" ▲▼"): th for th in browser.find_elements("css selector", "#head th")}
    head["detection"].click()
    assert browser.find_element("css selector", "#rows tr a").text == "resid.0 / 149"
    head["detection"].click()                                        # ascending
    assert browser.find_element("css selector", "#rows tr a").text == "resid.0 / 0"
    # search narrows the rows; the next page shows the rest
    box = browser.find_element("id", "q")
    box.send_keys("feature 12")
    names = [a.text for a in browser.find_elements("css selector", "#rows tr a")]
    assert sorted(names) == sorted(f"resid.0 / {f}" for f in [12] + list(range(120, 130)))
    box.clear()                                                      # clear() fires no input event:
    browser.execute_script("var q=document.getElementById('q');q.value='';q.dispatchEvent(new Event('input'))")
    browser.find_element("id", "next").click()
    assert len(browser.find_elements("css selector", "#rows tr")) == 50
    assert browser.execute_script(PWNED) and problems(browser) == []
    # a row's link opens that feature's page
    link = browser.find_element("css selector", "#rows tr a")
    name = link.text
    link.click()
    time.sleep(0.2)
    assert browser.title == name.replace(" / ", " / feature ")
    assert browser.execute_script(PWNED) and problems(browser) == []
