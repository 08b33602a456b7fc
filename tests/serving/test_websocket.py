"""`/ws/predict` on the real server, with a real WebSocket client (the `websockets` library): answers,
errors that leave the socket usable, the size and rate limits, stale frames dropped, the Origin check
and the prediction metrics; and `POST /explain`, whose code the live explanations share."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from serving import explain
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import ALLOWED_ORIGIN, Mnist, b64, on_paper, png_bytes

MAX_BODY_BYTES = 8 * 1024 * 1024  # SERVING_MAX_BODY_BYTES's default, which the fixture server keeps


def ws_url(server: ServingProcess) -> str:
    return server.url.replace("http://", "ws://", 1) + "/ws/predict"


@pytest.fixture
def socket(serving_server: ServingProcess) -> Iterator[ClientConnection]:
    with connect(ws_url(serving_server), open_timeout=10, close_timeout=5) as ws:
        yield ws


def ask(ws: ClientConnection, message: dict[str, Any] | str) -> dict[str, Any]:
    ws.send(message if isinstance(message, str) else json.dumps(message))
    answer: dict[str, Any] = json.loads(ws.recv(timeout=20))
    return answer


def predictions_counted(server: ServingProcess, endpoint: str = "ws_predict") -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    # Every version's series (labels: endpoint, then version).
    prefix = f'mnist_prediction_latency_seconds_count{{endpoint="{endpoint}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_answers_mnist_digits_like_predict(
    socket: ClientConnection, serving_server: ServingProcess, served_version: str, serving_mnist_test: Mnist
) -> None:
    images, labels = serving_mnist_test
    counted_before = predictions_counted(serving_server)
    correct = 0
    for index in range(40):
        body: dict[str, Any] = {"pixels": images[index].tolist()}
        answer = ask(socket, {**body, "id": index})
        assert answer["type"] == "prediction", answer
        assert answer["id"] == index and answer["dropped"] == 0
        assert answer["model_version"] == served_version and answer["latency_ms"] > 0
        rest = httpx.post(serving_server.url + "/predict", json=body, timeout=10).json()
        assert answer["digit"] == rest["digit"]
        assert answer["probabilities"] == pytest.approx(rest["probabilities"], abs=1e-6)
        correct += answer["digit"] == labels[index]
    # The fixture model is briefly trained; it still reads most test digits.
    assert correct >= 32, correct
    # Images work as on /predict: a big black-on-white digit, as a data URL like the page sends.
    paper = "data:image/png;base64," + b64(png_bytes(on_paper(images[0])))
    answer = ask(socket, {"image": paper, "id": "paper"})
    assert answer["id"] == "paper" and answer["inverted"] is True
    assert (
        answer["digit"] == httpx.post(serving_server.url + "/predict", json={"image": paper}).json()["digit"]
    )
    # Counted in the prediction metrics under their own endpoint.
    assert predictions_counted(serving_server) == counted_before + 41


def test_bad_messages_get_an_error_and_the_socket_stays_usable(
    socket: ClientConnection, serving_mnist_test: Mnist
) -> None:
    not_json = ask(socket, "{not json")
    assert not_json["type"] == "error" and not_json["status"] == 400 and not_json["id"] is None
    assert "not valid JSON" in not_json["error"]

    short = ask(socket, {"pixels": [[0] * 28] * 27, "id": 1})
    assert short["type"] == "error" and short["status"] == 422
    assert short["error"].startswith("pixels") and short["detail"][0]["loc"] == ["pixels"]

    for message, expected in (
        ({"pixels": [["x"] * 28] * 28}, "pixels.0.0"),
        ({"image": "a", "pixels": [[0] * 28] * 28}, "exactly one"),
        ({"pixels": [[0] * 28] * 28, "extra": 1}, "extra"),
        ([1, 2, 3], "object"),
    ):
        answer = ask(socket, json.dumps(message))
        assert answer["type"] == "error" and answer["status"] == 422, answer
        assert expected in answer["error"].lower() or expected in json.dumps(answer["detail"]).lower()

    # Valid JSON whose image is not: found while decoding, reported with the frame's id.
    not_base64 = ask(socket, {"image": "not base64!", "id": 7})
    assert not_base64 == {"type": "error", "id": 7, "status": 422, "error": "'image' is not valid base64"}
    blank = ask(socket, {"image": b64(png_bytes(np.zeros((40, 40), np.uint8))), "id": 8})
    assert blank["status"] == 422 and "no digit found" in blank["error"]

    images, _ = serving_mnist_test
    answer = ask(socket, {"pixels": images[0].tolist(), "id": 9})
    assert answer["type"] == "prediction" and answer["id"] == 9


def test_explanation_on_request(
    socket: ClientConnection, serving_server: ServingProcess, serving_mnist_test: Mnist
) -> None:
    images, _ = serving_mnist_test
    body = {"pixels": images[1].tolist()}
    plain = ask(socket, {**body, "id": 1})
    assert "saliency" not in plain
    explained = ask(socket, {**body, "id": 2, "explain": True})
    assert explained["type"] == "prediction" and explained["digit"] == plain["digit"]
    rest = httpx.post(serving_server.url + "/explain", json=body, timeout=20).json()
    assert np.array(explained["saliency"]).shape == (28, 28)
    np.testing.assert_allclose(explained["saliency"], rest["saliency"], atol=1e-6)
    np.testing.assert_allclose(explained["input"], rest["input"])


def test_only_the_latest_frame_matters_when_busy(socket: ClientConnection, serving_mnist_test: Mnist) -> None:
    images, _ = serving_mnist_test
    frames = 60
    # Explanations take the server milliseconds each, and the frames arrive in microseconds.
    for index in range(1, frames + 1):
        socket.send(json.dumps({"pixels": images[index].tolist(), "id": index, "explain": True}))
    answers: list[dict[str, Any]] = []
    while not answers or answers[-1]["id"] != frames:
        answers.append(json.loads(socket.recv(timeout=30)))
    ids = [answer["id"] for answer in answers]
    assert all(answer["type"] == "prediction" for answer in answers)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # Every frame was answered or counted as dropped, and frames were dropped rather than queued.
    assert len(answers) + sum(answer["dropped"] for answer in answers) == frames
    assert len(answers) < frames / 2, ids


def test_an_oversize_message_closes_with_1009(socket: ClientConnection) -> None:
    socket.send("x" * (MAX_BODY_BYTES + 1))
    with pytest.raises(ConnectionClosed) as closed:
        socket.recv(timeout=20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert str(MAX_BODY_BYTES) in closed.value.rcvd.reason


def test_pages_from_other_origins_are_refused(
    serving_server: ServingProcess, serving_mnist_test: Mnist
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(serving_server), origin=Origin("http://elsewhere.example.test"), open_timeout=10)
    assert refused.value.response.status_code == 403
    images, _ = serving_mnist_test
    for origin in (ALLOWED_ORIGIN, serving_server.url):
        with connect(ws_url(serving_server), origin=Origin(origin), open_timeout=10) as ws:
            assert ask(ws, {"pixels": images[0].tolist()})["type"] == "prediction"


def test_rate_limit_per_connection(
    served_model: ServedModel, serving_cache_dir: Path, tmp_path: Path, serving_mnist_test: Mnist
) -> None:
    server = ServingProcess.start(
        tmp_path,
        tracking_uri=served_model.tracking_uri,
        model_uri=served_model.pinned_uri,
        cache_dir=serving_cache_dir,
        env={"SERVING_RATE_LIMIT_PER_SECOND": "1", "SERVING_RATE_LIMIT_BURST": "3"},
    )
    try:
        images, _ = serving_mnist_test
        with connect(ws_url(server), open_timeout=10) as ws:
            answers = [ask(ws, {"pixels": images[0].tolist(), "id": i}) for i in range(6)]
        statuses = [answer.get("status", 200) for answer in answers]
        # The burst of 3 passes (plus at most one token refilled meanwhile), then 429s.
        assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429, statuses
        limited = answers[-1]
        assert limited["error"] == "rate limit exceeded for this client" and limited["retry_after"] > 0
    finally:
        assert server.stop() in (0, -15)


# --- POST /explain ---------------------------------------------------------------------------------


def test_explain_route(
    serving_server: ServingProcess, served_version: str, serving_mnist_test: Mnist
) -> None:
    images, _ = serving_mnist_test
    counted_before = predictions_counted(serving_server, "explain")
    for image in images[:3]:
        body = {"pixels": image.tolist()}
        answer = httpx.post(serving_server.url + "/explain", json=body, timeout=20)
        assert answer.status_code == 200, answer.text
        explained = answer.json()
        predicted = httpx.post(serving_server.url + "/predict", json=body, timeout=10).json()
        assert explained["digit"] == predicted["digit"]
        assert explained["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-5)
        assert explained["model_version"] == served_version == answer.headers["x-model-version"]
        assert (explained["patch"], explained["stride"]) == (explain.PATCH, explain.STRIDE)
        saliency = np.array(explained["saliency"])
        seen = np.array(explained["input"])
        assert saliency.shape == seen.shape == (28, 28)
        np.testing.assert_allclose(seen, image / 255, atol=1e-3)  # an MNIST array is only scaled
        # Background farther than a patch from any ink cannot matter: occluding black with black.
        ink = seen > 0
        near_ink = np.zeros_like(ink)
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                near_ink |= np.roll(np.roll(ink, dy, axis=0), dx, axis=1)
        assert np.abs(saliency[~near_ink]).max() == 0.0
        assert saliency.max() > 0  # hiding some of the digit makes it less likely
    # One prediction each in the metrics, under its own endpoint (the occluded copies are not counted).
    assert predictions_counted(serving_server, "explain") == counted_before + 3
    bad = httpx.post(serving_server.url + "/explain", json={"pixels": [[0] * 28] * 27}, timeout=10)
    assert bad.status_code == 422 and "pixels" in bad.json()["error"]
    raw = httpx.post(serving_server.url + "/explain", content=b"x", headers={"Content-Type": "text/plain"})
    assert raw.status_code == 415
