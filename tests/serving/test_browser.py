"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
draw a digit with the mouse, see the live prediction and its heat-map arrive over the WebSocket while
drawing, upload an image, read the prediction the page shows."""

from __future__ import annotations

import base64
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from testing.serving import ServingProcess
from tests.serving.payloads import Mnist, on_paper

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_DIR = Path("/tmp")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "Debian's chromium and chromium-driver are required (scripts/install-system-deps.sh)"
    )
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1000,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_prediction(driver: WebDriver, previous_request_id: str | None = None) -> dict[str, str]:
    def shown(d: WebDriver) -> bool:
        if d.find_element(By.TAG_NAME, "body").get_attribute("data-state") != "predicted":
            return False
        return d.find_element(By.ID, "request-id").text not in ("", "\u2013", previous_request_id)

    WebDriverWait(driver, 20).until(shown)
    fields = ("digit", "confidence", "model", "latency", "roundtrip", "request-id")
    return {name: driver.find_element(By.ID, name).text for name in fields}


def wait_for_live(driver: WebDriver) -> dict[str, str]:
    """The first live answer: the page marks it with the id of the WebSocket frame it answers."""
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-live"))
    fields = ("digit", "confidence", "model", "request-id", "source")
    return {name: driver.find_element(By.ID, name).text for name in fields}


def wait_for_heatmap_of_submission(driver: WebDriver) -> None:
    def painted(d: WebDriver) -> bool:
        submitted = d.find_element(By.TAG_NAME, "body").get_attribute("data-submitted")
        return (
            submitted is not None
            and d.find_element(By.ID, "heatmap").get_attribute("data-frame") == submitted
        )

    WebDriverWait(driver, 20).until(painted)


def hot_cells(driver: WebDriver) -> npt.NDArray[np.bool_]:
    """The heat-map element as the screen shows it, reduced to its 28x28 cells: True where red or
    yellow dominates (the stroke alone is grey, the background black)."""
    shot = Image.open(io.BytesIO(driver.find_element(By.ID, "heatmap").screenshot_as_png)).convert("RGB")
    pixels = np.asarray(shot).astype(int)
    height, width = pixels.shape[:2]
    assert height >= 28 and width >= 28, (height, width)
    assert pixels.std() > 10, "the heat-map is blank"
    red, blue = pixels[..., 0], pixels[..., 2]
    hot = (red >= 150) & (red - blue >= 100)
    cells = np.zeros((28, 28), bool)
    ys, xs = np.nonzero(hot)
    cells[ys * 28 // height, xs * 28 // width] = True
    return cells


def near(mask: npt.NDArray[np.bool_], distance: int) -> npt.NDArray[np.bool_]:
    grown = np.zeros_like(mask)
    padded = np.pad(mask, distance)
    for dy in range(2 * distance + 1):
        for dx in range(2 * distance + 1):
            grown |= padded[dy : dy + 28, dx : dx + 28]
    return grown


def clear_paper_digit(server: ServingProcess, mnist: Mnist, path: Path) -> int:
    images, labels = mnist
    for index in range(50):
        Image.fromarray(on_paper(images[index])).save(path)
        response = httpx.post(
            server.url + "/predict",
            content=path.read_bytes(),
            headers={"Content-Type": "image/png"},
            timeout=10,
        ).json()
        if response["digit"] == labels[index] and response["confidence"] > 0.8:
            return int(labels[index])
    raise AssertionError("the model reads none of the first 50 test digits drawn on paper")


def severe_console_messages(driver: WebDriver) -> list[str]:
    entries = driver.get_log("browser")  # type: ignore[attr-defined]  # Chromium-only API
    return [entry["message"] for entry in entries if entry["level"] == "SEVERE"]


def test_draw_a_digit_and_upload_an_image(
    browser: WebDriver,
    serving_server: ServingProcess,
    served_version: str,
    serving_mnist_test: Mnist,
    tmp_path: Path,
) -> None:
    browser.get(serving_server.url + "/")
    WebDriverWait(browser, 20).until(lambda d: "version" in d.find_element(By.ID, "model-status").text)
    assert served_version in browser.find_element(By.ID, "model-status").text

    # Draw a "1" the way a person would: press, drag down in small steps...
    pad = browser.find_element(By.ID, "pad")
    actions = ActionChains(browser, duration=10)
    actions.move_to_element_with_offset(pad, 8, -95).click_and_hold()
    for _ in range(19):
        actions.move_by_offset(-1, 10)
    actions.perform()
    # ...and, the button still down, nothing submitted yet, predictions arrive over the WebSocket.
    live = wait_for_live(browser)
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "digit").text == "1")
    body = browser.find_element(By.TAG_NAME, "body")
    assert body.get_attribute("data-state") == "drawing"
    assert live["request-id"] == "\u2013" and live["source"] == "LIVE", live
    assert live["model"].endswith(f"v{served_version}")
    assert int(body.get_attribute("data-live") or 0) >= 1
    assert browser.find_element(By.ID, "heatmap").get_attribute("data-frame")
    assert browser.find_element(By.ID, "explanation").is_displayed()
    assert browser.find_element(By.ID, "live-status").text == "Live predictions: on"
    # ...then release: the drawing is submitted to /predict.
    ActionChains(browser).release().perform()
    drawn = wait_for_prediction(browser)
    assert drawn["digit"] == "1", drawn
    assert drawn["model"].endswith(f"v{served_version}")
    assert drawn["latency"].endswith(" ms") and float(drawn["latency"].split()[0]) > 0
    assert drawn["confidence"].endswith("%")
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars li")
    assert [bar.get_attribute("data-digit") for bar in bars] == [str(d) for d in range(10)]
    top = browser.find_elements(By.CSS_SELECTOR, "#bars li.top")
    assert len(top) == 1 and top[0].get_attribute("data-digit") == "1"
    assert browser.find_element(By.ID, "inverted-note").is_displayed()  # black ink on white

    # The page shows what the API says for exactly that canvas.
    data_url = browser.execute_script("return document.getElementById('pad').toDataURL('image/png')")
    api = httpx.post(serving_server.url + "/predict", json={"image": data_url}, timeout=10).json()
    assert str(api["digit"]) == drawn["digit"]
    assert f"{api['confidence'] * 100:.1f}%" == drawn["confidence"]
    assert not browser.find_element(By.ID, "source").is_displayed()  # this answer is /predict's

    # The heat-map of the submitted drawing is painted, and its hot cells lie over the stroke the
    # model saw (POST /explain says where that is, and where the answer depends on it most).
    wait_for_heatmap_of_submission(browser)
    browser.save_screenshot(str(SCREENSHOT_DIR / "serving-page-drawn.png"))
    hot = hot_cells(browser)
    explained = httpx.post(serving_server.url + "/explain", json={"image": data_url}, timeout=20).json()
    stroke = np.array(explained["input"]) > 0.1
    saliency = np.array(explained["saliency"])
    assert hot.sum() >= 3, "nothing hot on the heat-map"
    assert hot.sum() < stroke.size / 2
    # A 4x4 patch over the stroke also covers up to 3 pixels beside it: no farther.
    assert not (hot & ~near(stroke, 3)).any(), np.argwhere(hot & ~near(stroke, 3))
    hottest = np.unravel_index(int(saliency.argmax()), saliency.shape)
    assert hot[hottest], (hottest, np.argwhere(hot))

    # Upload a picture of a test digit (big, black on white) through the file input. The fixture
    # model is briefly trained: use a digit it reads right, so the check is about the page.
    upload = tmp_path / "digit.png"
    label = clear_paper_digit(serving_server, serving_mnist_test, upload)
    browser.find_element(By.ID, "upload").send_keys(str(upload))
    uploaded = wait_for_prediction(browser, previous_request_id=drawn["request-id"])
    assert uploaded["digit"] == str(label), uploaded
    wait_for_heatmap_of_submission(browser)
    assert hot_cells(browser).any()
    browser.save_screenshot(str(SCREENSHOT_DIR / "serving-page-uploaded.png"))

    # Clear, then predicting an empty pad explains itself instead of calling the server.
    browser.find_element(By.ID, "clear").click()
    browser.find_element(By.ID, "predict").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 5).until(lambda _: error.is_displayed())
    assert "Draw a digit first" in error.text
    assert severe_console_messages(browser) == []


def test_page_reports_server_errors(
    browser: WebDriver, serving_server: ServingProcess, tmp_path: Path
) -> None:
    browser.get(serving_server.url + "/")
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 255).save(blank)
    browser.find_element(By.ID, "upload").send_keys(str(blank))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 20).until(lambda _: error.is_displayed())
    assert "no digit found" in error.text
    started = time.monotonic()
    # A bad upload is not a broken page: the pad still works afterwards.
    pad = browser.find_element(By.ID, "pad")
    ActionChains(browser).move_to_element_with_offset(pad, 0, -80).click_and_hold().move_by_offset(
        0, 160
    ).release().perform()
    wait_for_prediction(browser)
    assert time.monotonic() - started < 20
    screenshot = base64.b64decode(browser.get_screenshot_as_base64())
    assert screenshot.startswith(b"\x89PNG")
    # The blank upload is answered 422: Chromium logs the failed fetch itself, nothing else.
    unexpected = [m for m in severe_console_messages(browser) if "422" not in m]
    assert unexpected == []
