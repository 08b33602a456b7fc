"""`POST /feedback` on real serving processes writing a real prediction log (SQLite and PostgreSQL):
a label joins the logged input of the prediction it names, once (the same label again is a no-op, a
different one a 409), unknown ids are 404, bad bodies 4xx with messages that say what is wrong, the
requests share the client's inference rate limit; and the web page in headless Chromium sends the
label a person clicks after a prediction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from prediction_log import PredictionStore
from testing.postgres import PostgresServer
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import Mnist
from tests.serving.test_browser import browser, severe_console_messages, wait_for_prediction
from tests.serving.test_prediction_log import database_url, metric_value, start_logging_server, stop_cleanly

__all__ = ["browser"]  # the headless Chromium fixture, shared with test_browser


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def logging_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    served_model: ServedModel,
    serving_cache_dir: Path,
) -> Iterator[tuple[ServingProcess, str]]:
    """A server logging every prediction, flushing only every minute: a label sent right after its
    prediction finds the record still queued (the route flushes it first)."""
    backend: str = request.param
    workdir = tmp_path_factory.mktemp(f"feedback-{backend}")
    postgres: PostgresServer | None = request.getfixturevalue("postgres") if backend == "postgresql" else None
    url = database_url(backend, workdir, postgres, "feedback")
    server = start_logging_server(
        workdir, served_model, serving_cache_dir, url, SERVING_PREDICTION_LOG_FLUSH_SECONDS="60"
    )
    yield server, url
    stop_cleanly(server)


def predict(http: httpx.Client, image: np.ndarray[Any, Any]) -> dict[str, Any]:
    answer = http.post("/predict", json={"pixels": image.tolist()})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["request_id"] == answer.headers["x-request-id"]
    return body


def test_feedback_joins_the_logged_input_once(
    logging_server: tuple[ServingProcess, str], serving_mnist_test: Mnist
) -> None:
    server, url = logging_server
    images, labels = serving_mnist_test
    with httpx.Client(base_url=server.url, timeout=30) as http:
        counts = {
            outcome: metric_value(server.url, "mnist_feedback_total", outcome=outcome)
            for outcome in ("created", "unchanged", "conflict")
        }
        answered = predict(http, images[0])
        request_id, label = answered["request_id"], int(labels[0])

        first = http.post("/feedback", json={"request_id": request_id, "label": label})
        assert first.status_code == 201, first.text
        assert first.json() == {"request_id": request_id, "label": label, "outcome": "created"}

        again = http.post("/feedback", json={"request_id": request_id, "label": label})
        assert again.status_code == 200, again.text
        assert again.json()["outcome"] == "unchanged"

        other = (label + 1) % 10
        conflict = http.post("/feedback", json={"request_id": request_id, "label": other})
        assert conflict.status_code == 409, conflict.text
        assert conflict.json()["error"] == (
            f"request id {request_id!r} is already labelled {label}; a label is never changed"
        )

        # A batch's images are labelled one by one, as <request id>-<i>.
        batch = http.post(
            "/predict/batch",
            json={"instances": [{"pixels": images[i].tolist()} for i in (1, 2)]},
            headers={"X-Request-ID": f"fb-batch-{server.port}"},
        )
        assert batch.status_code == 200, batch.text
        item = http.post(
            "/feedback", json={"request_id": f"fb-batch-{server.port}-1", "label": int(labels[2])}
        )
        assert item.status_code == 201, item.text

        after = {
            outcome: metric_value(server.url, "mnist_feedback_total", outcome=outcome)
            for outcome in ("created", "unchanged", "conflict")
        }
        assert {k: after[k] - counts[k] for k in counts} == {"created": 2, "unchanged": 1, "conflict": 1}

    store = PredictionStore(url)
    row = store.get(request_id)
    assert row is not None and row.label == label and row.labelled_at is not None
    assert row.source == "predict" and row.predicted == answered["digit"]
    assert np.array_equal(row.image, images[0]), "the label is joined to another input"
    item_row = store.get(f"fb-batch-{server.port}-1")
    assert item_row is not None and item_row.label == int(labels[2])
    assert np.array_equal(item_row.image, images[2])
    unlabelled = store.get(f"fb-batch-{server.port}-0")
    assert unlabelled is not None and unlabelled.label is None
    labelled = store.labelled()
    assert request_id in labelled.request_ids
    assert labelled.labels[labelled.request_ids.index(request_id)] == label
    store.close()


def test_an_unknown_id_is_404(logging_server: tuple[ServingProcess, str]) -> None:
    server, _ = logging_server
    answer = httpx.post(server.url + "/feedback", json={"request_id": "never-served", "label": 3}, timeout=30)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"].startswith("request id 'never-served' is not in the prediction log")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"request_id": "abc", "label": 10}, 422, "label: Input should be less than or equal to 9"),
        ({"request_id": "abc", "label": -1}, 422, "label: Input should be greater than or equal to 0"),
        ({"request_id": "abc", "label": "3"}, 422, "label: Input should be a valid integer"),
        ({"request_id": "abc", "label": 3.0}, 422, "label: Input should be a valid integer"),
        ({"request_id": "abc", "label": True}, 422, "label: Input should be a valid integer"),
        ({"request_id": "abc"}, 422, "label: Field required"),
        ({"label": 3}, 422, "request_id: Field required"),
        ({"request_id": "", "label": 3}, 422, "request_id: String should have at least 1 character"),
        ({"request_id": "x" * 137, "label": 3}, 422, "request_id: String should have at most 136 characters"),
        ({"request_id": "a b", "label": 3}, 422, "request_id: String should match pattern"),
        ({"request_id": "abc", "label": 3, "digit": 3}, 422, "digit: Extra inputs are not permitted"),
    ],
)
def test_bad_feedback_is_refused_with_a_clear_message(
    logging_server: tuple[ServingProcess, str], body: dict[str, Any], status: int, message: str
) -> None:
    server, _ = logging_server
    answer = httpx.post(server.url + "/feedback", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"].startswith(message), answer.json()


def test_broken_bodies_are_400_and_415(logging_server: tuple[ServingProcess, str]) -> None:
    server, _ = logging_server
    broken = httpx.post(
        server.url + "/feedback", content=b'{"request_id": ', headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"], broken.text
    text = httpx.post(server.url + "/feedback", content=b"abc 3", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415 and "application/json" in text.json()["error"], text.text
    # The route is in the API document of a server that logs.
    assert "/feedback" in httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]


def test_without_the_log_feedback_is_503_with_the_reason(serving_server: ServingProcess) -> None:
    answer = httpx.post(serving_server.url + "/feedback", json={"request_id": "abc", "label": 3}, timeout=10)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == (
        "the prediction log is off on this server (SERVING_PREDICTION_LOG_URL is not set)"
    )
    # Not offered in the API document of a server that cannot take it.
    assert "/feedback" not in httpx.get(serving_server.url + "/openapi.json", timeout=10).json()["paths"]


def test_feedback_counts_against_the_inference_rate_limit(
    tmp_path: Path, served_model: ServedModel, serving_cache_dir: Path, serving_mnist_test: Mnist
) -> None:
    images, labels = serving_mnist_test
    server = start_logging_server(
        tmp_path,
        served_model,
        serving_cache_dir,
        f"sqlite:///{tmp_path / 'limited.db'}",
        # Three requests, then one every 20 s: the test never waits for a token.
        SERVING_RATE_LIMIT_PER_SECOND="0.05",
        SERVING_RATE_LIMIT_BURST="3",
    )
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            first = predict(http, images[0])
            predict(http, images[1])
            label = {"request_id": first["request_id"], "label": int(labels[0])}
            assert http.post("/feedback", json=label).status_code == 201  # the third token
            limited = http.post("/feedback", json=label)
            assert limited.status_code == 429, limited.text
            assert limited.json()["error"] == "rate limit exceeded for this client"
            assert int(limited.headers["retry-after"]) >= 1
            # One bucket: the feedback spent what /predict would have had.
            assert http.post("/predict", json={"pixels": images[2].tolist()}).status_code == 429
            assert metric_value(server.url, "mnist_http_rejected_requests_total", reason="rate_limited") == 2
    finally:
        stop_cleanly(server)


def test_the_page_sends_the_label_a_person_clicks(
    browser: WebDriver, tmp_path: Path, served_model: ServedModel, serving_cache_dir: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'page.db'}"
    server = start_logging_server(tmp_path, served_model, serving_cache_dir, url)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 20).until(lambda d: "version" in d.find_element(By.ID, "model-status").text)
        assert not browser.find_element(By.ID, "feedback").is_displayed()  # nothing predicted yet
        # Draw a "1" (as test_browser does); releasing the button submits the drawing to /predict.
        pad = browser.find_element(By.ID, "pad")
        actions = ActionChains(browser, duration=10)
        actions.move_to_element_with_offset(pad, 8, -95).click_and_hold()
        for _ in range(19):
            actions.move_by_offset(-1, 10)
        actions.release().perform()
        shown = wait_for_prediction(browser)
        request_id = shown["request-id"]
        feedback = browser.find_element(By.ID, "feedback")
        assert feedback.is_displayed() and "Wrong? It was a" in feedback.text
        buttons = feedback.find_elements(By.CSS_SELECTOR, "button[data-digit]")
        assert [b.text for b in buttons] == [str(d) for d in range(10)]

        buttons[7].click()
        WebDriverWait(browser, 20).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-feedback") == "created"
        )
        assert browser.find_element(By.ID, "feedback-status").text == "Thank you: recorded as a 7."
        assert all(not b.is_enabled() for b in buttons)  # one label per prediction
        assert "chosen" in (buttons[7].get_attribute("class") or "")
        assert not severe_console_messages(browser)
    finally:
        stop_cleanly(server)
    store = PredictionStore(url)
    row = store.get(request_id)
    assert row is not None, f"the page's prediction {request_id} is not in the log"
    assert row.label == 7 and row.source == "predict" and str(row.predicted) == shown["digit"]
    store.close()
