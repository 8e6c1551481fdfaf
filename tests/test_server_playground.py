"""The playground page at /, driven in headless Chromium: type a prefix and a suffix, click, and the streamed
middle is the engine's own greedy infill. Skipped without Chromium + chromedriver (Debian: apt-get install
chromium chromium-driver) or selenium."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi", reason="the server tests need the server extra: pip install -e '.[server]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the playground test needs selenium (test extra)")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not (CHROMEDRIVER and CHROMIUM):
    pytest.skip("the playground test needs Chromium and chromedriver: apt-get install -y chromium chromium-driver",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_server import alone, live_server, tiny  # noqa: E402, F401  (tiny is a fixture)

from codegen2.engine.engine import Engine  # noqa: E402
from codegen2.engine.sampling import SamplingParams  # noqa: E402
from codegen2.infill import Infill  # noqa: E402
from codegen2.server.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def fill(browser, id: str, text: str) -> None:
    box = browser.find_element(By.ID, id)
    box.clear()
    box.send_keys(text)


def test_playground_streams_an_infill(tiny, browser):
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    expected = alone(tiny, [Infill(prefix, suffix)], SamplingParams(max_tokens=12))[0][0]
    with live_server(create_app(lambda: Engine(*tiny, max_batch=2), "tiny", api_keys=["k"])) as url:
        browser.get(url + "/")
        fill(browser, "prefix", prefix)
        fill(browser, "suffix", suffix)
        fill(browser, "max_tokens", "12")
        fill(browser, "temperature", "0")
        fill(browser, "api_key", "k")
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "status").get_attribute("data-done"))
        status = browser.find_element(By.ID, "status").text
        middle = browser.execute_script("return document.getElementById('middle').textContent")
        assert status == f"done ({expected.finish_reason})"
        assert middle == expected.text
        # A wrong key shows the server's error message instead of failing silently.
        fill(browser, "api_key", "wrong")
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "status").get_attribute("data-done"))
        assert "invalid or missing API key" in browser.find_element(By.ID, "status").text
