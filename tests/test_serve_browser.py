"""``ssbctl serve`` in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven
by Selenium): type a query, the grid shows the expected top result, its thumbnail loads, the video
plays, "more like this" puts the clicked video first, "why" draws the attention; screenshots are
saved with the test's files (and copied to $SSBCTL_TEST_ARTIFACTS when set).

A missing browser fails the test (``.ci/run`` installs both packages with apt-get); only outside CI,
with SSBCTL_NO_BROWSER=1 set on purpose, is it skipped."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ssbctl.data.store import FeatureStore
from ssbctl.retrieval.search import Searcher
from test_serve import build_served, start_serve, stop

TOKEN = "browser-t0ken"


def _browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver; fails (or, on purpose outside CI, skips) when missing."""
    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        message = (f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver "
                   f"(.ci/run does when root)")
        if os.environ.get("SSBCTL_NO_BROWSER") == "1" and not os.environ.get("CI"):
            pytest.skip(message + "; skipped because SSBCTL_NO_BROWSER=1")
        pytest.fail(message)
    return found["chromium"], found["chromedriver"]  # type: ignore[return-value]


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    browser, chromedriver = _browser()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1200,1000", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=options, service=DriverService(executable_path=chromedriver,
                                                                  log_output=str(tmp_path / "chromedriver.log")))
    drv.set_page_load_timeout(120)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def served(shapes_store: Path, tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_served(tmp_path_factory.mktemp("served-browser"), shapes_store, tiny_text_model)


def _query_and_expected(index_dir: Path) -> tuple[str, list[str]]:
    """A caption whose own video the library ranks first, and the library's top 6 for it."""
    searcher = Searcher(index_dir)
    captions = FeatureStore(Path(searcher.index.meta["source"])).split_captions("train")
    texts = [c["caption"] for c in captions]
    results = searcher.videos_for_texts(texts, 6)
    for caption, hits in zip(captions, results):
        if hits[0]["video_id"] == caption["video_id"]:
            return caption["caption"], [h["video_id"] for h in hits]
    raise AssertionError("the tiny run ranks no caption's own video first")


def _save(drv: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    assert drv.save_screenshot(str(shot)), "the screenshot was not written"
    if os.environ.get("SSBCTL_TEST_ARTIFACTS"):
        target = Path(os.environ["SSBCTL_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target / name)
    return shot


def test_search_play_more_like_this_and_why_in_chromium(served, driver, tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    query, expected = _query_and_expected(served[1])
    proc, url, _ = start_serve([str(served[1]), "--token", TOKEN])
    wait = WebDriverWait(driver, 90)
    try:
        driver.get(url)
        box = driver.find_element(By.ID, "q")
        box.clear()
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys("6")
        box.send_keys(query)
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 6)
        cards = driver.find_elements(By.CSS_SELECTOR, "#grid .card")
        assert [c.get_attribute("data-video-id") for c in cards] == expected  # the library's ranking
        assert "q=" in driver.current_url and "k=6" in driver.current_url  # kept in the URL
        thumb = cards[0].find_element(By.TAG_NAME, "img")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb))
        assert driver.execute_script("return arguments[0].naturalWidth", thumb) > 0
        shot = _save(driver, tmp_path, "serve-results.png")

        cards[0].click()  # the video plays in the page
        video = driver.find_element(By.ID, "video")
        wait.until(lambda d: d.execute_script(
            "const v = arguments[0]; return v.error === null && !v.paused && v.currentTime > 0.05", video))
        first = driver.execute_script("return arguments[0].played.end(0)", video)
        wait.until(lambda d: d.execute_script(
            "const v = arguments[0]; return v.played.end(v.played.length - 1) > arguments[1] + 0.1", video, first))
        assert driver.execute_script("return arguments[0].error", video) is None

        driver.find_element(By.ID, "why").click()  # the support-set attention, drawn in the page
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#explain td")) >= 4)
        _save(driver, tmp_path, "serve-playing.png")

        driver.find_element(By.ID, "like").click()  # more like this: the clicked video comes first
        wait.until(lambda d: d.find_element(By.ID, "heading").text.startswith("more like"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 6)
        liked = [c.get_attribute("data-video-id") for c in driver.find_elements(By.CSS_SELECTOR, "#grid .card")]
        assert liked[0] == expected[0]
        assert "like=" in driver.current_url

        driver.get(driver.current_url)  # a reload shows the same results, from the URL alone
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 6)
        assert driver.find_elements(By.CSS_SELECTOR, "#grid .card")[0].get_attribute("data-video-id") == expected[0]
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe  # no failed request, no refused script or style (CSP)
    finally:
        assert stop(proc) in (0, 143)
    with Image.open(shot) as image:
        assert image.size[0] >= 800 and image.size[1] >= 600
    print(f"screenshot: {shot}")
