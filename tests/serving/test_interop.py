"""Open Inference Protocol clients written by others, used unmodified against the real service:
Triton's `tritonclient.http` (JSON and binary tensors) and KServe's `InferenceRESTClient`, each in its
own virtualenv (`testing.peers`) and driven by a script over subprocess. Their predictions must be
`/predict`'s for the same MNIST test images. Also the binary framing's failure modes, and the 413 for
clients that send an over-limit body without waiting for `100 Continue`."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from testing.peers import peer_python
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import Mnist

COUNT = 8
DIGITS = "predicted_digit"
PEER_TIMEOUT = 300

TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

spec = json.load(sys.stdin)
model, version = spec["model"], spec["version"]
client = httpclient.InferenceServerClient(url=spec["url"])
metadata = client.get_model_metadata(model)
name = metadata["inputs"][0]["name"]
probabilities = metadata["outputs"][0]["name"]
images = np.asarray(spec["images"], dtype=np.uint8)
count = len(images)


def run(inputs, outputs=None, model_version=""):
    result = client.infer(model, inputs, outputs=outputs, model_version=model_version)
    response = result.get_response()
    return {
        "digits": result.as_numpy("predicted_digit").tolist(),
        "probabilities": result.as_numpy(probabilities).tolist(),
        "outputs": {o["name"]: {k: v for k, v in o.items() if k != "data"} | {"has_data": "data" in o}
                    for o in response["outputs"]},
    }


report = {
    "live": client.is_server_live(),
    "ready": client.is_model_ready(model),
    "extensions": client.get_server_metadata()["extensions"],
}

# JSON both ways: FP32 in 0..1, nested as the model's own input shape, and each output asked as JSON.
x = (images.astype(np.float32) / 255).reshape(count, 28, 28, 1)
json_input = httpclient.InferInput(name, list(x.shape), "FP32")
json_input.set_data_from_numpy(x, binary_data=False)
json_outputs = [
    httpclient.InferRequestedOutput(n, binary_data=False) for n in (probabilities, "predicted_digit")
]
report["json"] = run([json_input], json_outputs)

# Binary both ways: UINT8 bytes in; no outputs named, so the client asks for every output as binary.
u8 = images.reshape(count, 784)
binary_input = httpclient.InferInput(name, list(u8.shape), "UINT8")
binary_input.set_data_from_numpy(u8)
report["binary"] = run([binary_input])

# Mixed, on the versioned route: FP32 bytes in; digits as binary, probabilities as JSON.
f32 = (images.astype(np.float32) / 255).reshape(count, 28, 28)
mixed_input = httpclient.InferInput(name, list(f32.shape), "FP32")
mixed_input.set_data_from_numpy(f32)
mixed_outputs = [
    httpclient.InferRequestedOutput("predicted_digit", binary_data=True),
    httpclient.InferRequestedOutput(probabilities, binary_data=False),
]
report["mixed"] = run([mixed_input], mixed_outputs, model_version=version)

# Our 4xx message reaches the client's exception.
bad = httpclient.InferInput(name, [1, 27, 27], "UINT8")
bad.set_data_from_numpy(np.zeros((1, 27, 27), dtype=np.uint8))
try:
    client.infer(model, [bad])
except InferenceServerException as exc:
    report["error"] = str(exc)
print(json.dumps(report))
"""

KSERVE_SCRIPT = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

spec = json.load(sys.stdin)
model, url, name = spec["model"], spec["url"], spec["input_name"]
images = np.asarray(spec["images"], dtype=np.uint8)
count = len(images)


def outputs(response):
    return {o.name: o.as_numpy().tolist() for o in response.outputs}


async def main():
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    report = {}

    json_input = InferInput(name, [count, 784], "UINT8")
    json_input.set_data_from_numpy(images.reshape(count, 784), binary_data=False)
    request = InferRequest(model_name=model, infer_inputs=[json_input], request_id="kserve-json")
    response = await client.infer(url, request, model_name=model)
    report["json"] = {"id": response.id, "model_name": response.model_name, "outputs": outputs(response)}

    x = (images.astype(np.float32) / 255).reshape(count, 28, 28, 1)
    binary_input = InferInput(name, list(x.shape), "FP32")
    binary_input.set_data_from_numpy(x, binary_data=True)
    request = InferRequest(
        model_name=model,
        infer_inputs=[binary_input],
        request_id="kserve-binary",
        parameters={"binary_data_output": True},
        request_outputs=[RequestedOutput("predicted_digit")],
    )
    headers = {}
    response = await client.infer(url, request, model_name=model, response_headers=headers)
    report["binary"] = {
        "id": response.id,
        "outputs": outputs(response),
        "content_type": headers.get("content-type"),
        "header_length": headers.get("inference-header-content-length"),
    }
    print(json.dumps(report))


asyncio.run(main())
"""


@pytest.fixture(scope="module")
def model_io(client: httpx.Client, served_model: ServedModel) -> tuple[str, str]:
    """(input name, probabilities output name) as the model's v2 metadata gives them."""
    metadata = client.get(f"/v2/models/{served_model.name}").json()
    return metadata["inputs"][0]["name"], metadata["outputs"][0]["name"]


@pytest.fixture(scope="module")
def images(serving_mnist_test: Mnist) -> np.ndarray:
    return serving_mnist_test[0][:COUNT]


@pytest.fixture(scope="module")
def expected(client: httpx.Client, images: np.ndarray) -> dict[str, Any]:
    """What `/predict/batch` answers for the same images: the reference for every client."""
    response = client.post("/predict/batch", json={"instances": [{"pixels": i.tolist()} for i in images]})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    return {
        "digits": [p["digit"] for p in predictions],
        "probabilities": [p["probabilities"] for p in predictions],
    }


def run_peer(peer: str, script: str, spec: dict[str, Any]) -> dict[str, Any]:
    completed = subprocess.run(
        [str(peer_python(peer)), "-c", script],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=PEER_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return report


def test_tritonclient_http_json_and_binary_tensors(
    *,
    serving_server: ServingProcess,
    served_model: ServedModel,
    served_version: str,
    model_io: tuple[str, str],
    images: np.ndarray,
    expected: dict[str, Any],
) -> None:
    spec = {
        "url": urlsplit(serving_server.url).netloc,  # tritonclient takes host:port
        "model": served_model.name,
        "version": served_version,
        "images": images.tolist(),
    }
    report = run_peer("tritonclient", TRITON_SCRIPT, spec)
    assert report["live"] and report["ready"]
    assert "binary_tensor_data" in report["extensions"]
    probabilities = model_io[1]
    for mode in ("json", "binary", "mixed"):
        run = report[mode]
        assert run["digits"] == expected["digits"], mode
        assert np.asarray(run["probabilities"]) == pytest.approx(
            np.asarray(expected["probabilities"]), abs=1e-6
        )
    # The server answered in the encoding each output was asked for.
    digits = {"name": DIGITS, "datatype": "INT64", "shape": [COUNT]}
    assert report["json"]["outputs"][DIGITS] == {**digits, "has_data": True}
    binary_digits = {**digits, "has_data": False, "parameters": {"binary_data_size": COUNT * 8}}
    assert report["binary"]["outputs"][DIGITS] == binary_digits
    assert report["binary"]["outputs"][probabilities]["parameters"] == {"binary_data_size": COUNT * 10 * 4}
    assert report["mixed"]["outputs"][DIGITS]["parameters"] == {"binary_data_size": COUNT * 8}
    assert report["mixed"]["outputs"][probabilities]["has_data"]
    assert "is not [N,28,28]" in report["error"], report["error"]


def test_kserve_rest_client_json_and_binary_tensors(
    serving_server: ServingProcess,
    served_model: ServedModel,
    model_io: tuple[str, str],
    images: np.ndarray,
    expected: dict[str, Any],
) -> None:
    spec = {
        "url": serving_server.url,
        "model": served_model.name,
        "input_name": model_io[0],
        "images": images.tolist(),
    }
    report = run_peer("kserve", KSERVE_SCRIPT, spec)
    plain, binary = report["json"], report["binary"]
    assert plain["id"] == "kserve-json" and plain["model_name"] == served_model.name
    assert plain["outputs"][DIGITS] == expected["digits"]
    assert np.asarray(plain["outputs"][model_io[1]]) == pytest.approx(
        np.asarray(expected["probabilities"]), abs=1e-6
    )
    assert binary["id"] == "kserve-binary"
    assert list(binary["outputs"]) == [DIGITS]
    assert binary["outputs"][DIGITS] == expected["digits"]
    # KServe drops binary_data_size once it has decoded the bytes; the response headers still tell.
    assert binary["content_type"] == "application/octet-stream"
    assert int(binary["header_length"]) > 0


# --- the binary framing, by hand --------------------------------------------------------------------


def _binary_request(
    input_name: str, image: np.ndarray, *, size: Any = 784, extra: bytes = b""
) -> tuple[bytes, dict[str, str]]:
    """One UINT8 [1,784] input as binary tensor data: (body, headers); `size` is what it claims."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [1, 784],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    body = head + image.astype(np.uint8).tobytes() + extra
    return body, {"Inference-Header-Content-Length": str(len(head))}


def test_binary_framing_by_hand(
    client: httpx.Client,
    served_model: ServedModel,
    model_io: tuple[str, str],
    images: np.ndarray,
    expected: dict[str, Any],
) -> None:
    url = f"/v2/models/{served_model.name}/infer"
    body, headers = _binary_request(model_io[0], images[0])
    head_length = int(headers["Inference-Header-Content-Length"])
    # No Content-Type at all (as tritonclient sends), and octet-stream (as KServe's client sends).
    for content_type in (None, "application/octet-stream"):
        sent = {**headers, **({"Content-Type": content_type} if content_type else {})}
        response = client.post(url, content=body, headers=sent)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert "inference-header-content-length" not in response.headers
        assert response.json()["outputs"][1]["data"] == expected["digits"][:1]
    # Binary outputs: the JSON header, then float32 probabilities and int64 digits, little-endian.
    request = json.loads(body[:head_length])
    request["parameters"] = {"binary_data_output": True}
    head = json.dumps(request).encode()
    response = client.post(
        url,
        content=head + body[head_length:],
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    split = int(response.headers["inference-header-content-length"])
    answer = json.loads(response.content[:split])
    sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
    assert sizes == [40, 8] and all("data" not in o for o in answer["outputs"])
    tail = response.content[split:]
    assert len(tail) == sum(sizes)
    probabilities = np.frombuffer(tail[:40], dtype="<f4")
    digits = np.frombuffer(tail[40:], dtype="<i8")
    assert digits.tolist() == expected["digits"][:1]
    assert probabilities.tolist() == pytest.approx(expected["probabilities"][0], abs=1e-6)


def _bad_framings(input_name: str, image: np.ndarray) -> list[tuple[str, bytes, dict[str, str], str]]:
    good, headers = _binary_request(input_name, image)
    length = int(headers["Inference-Header-Content-Length"])
    both = json.loads(good[:length])
    both["inputs"][0]["data"] = [0] * 784
    both_head = json.dumps(both).encode()

    def header(value: object) -> dict[str, str]:
        return {"Inference-Header-Content-Length": str(value)}

    return [
        ("header-not-a-number", good, header("abc"), "not a byte count"),
        ("header-negative", good, header(-1), "not a byte count"),
        ("header-signed", good, header(f"+{length}"), "not a byte count"),
        ("header-huge", good, header("9" * 40), "not a byte count"),
        ("header-past-body", good, header(len(good) + 1), "body has only"),
        ("header-cuts-json", good, header(length - 1), "not valid JSON"),
        ("size-past-end", *_binary_request(input_name, image, size=785), "only 784 bytes"),
        ("bytes-left-over", *_binary_request(input_name, image, extra=b"\0"), "belong to no input"),
        ("size-short-of-shape", *_binary_request(input_name, image[:756], size=756), "needs 784"),
        ("size-string", *_binary_request(input_name, image, size="784"), "byte count"),
        ("size-bool", *_binary_request(input_name, image, size=True), "byte count"),
        ("size-negative", *_binary_request(input_name, image, size=-1), "byte count"),
        ("size-float", *_binary_request(input_name, image, size=784.5), "byte count"),
        ("data-and-binary", both_head + good[length:], header(len(both_head)), "both 'data' and"),
        # No header: the whole body is JSON, so a binary_data_size has nothing to point at.
        ("binary-without-header", good[:length], {}, "only 0 bytes"),
    ]


def test_bad_binary_lengths_get_400(
    client: httpx.Client,
    served_model: ServedModel,
    model_io: tuple[str, str],
    images: np.ndarray,
    expected: dict[str, Any],
) -> None:
    url = f"/v2/models/{served_model.name}/infer"
    for name, body, headers, message in _bad_framings(model_io[0], images[0].ravel()):
        response = client.post(url, content=body, headers=headers)
        assert response.status_code == 400, (name, response.text)
        assert message in response.json()["error"], (name, response.json())
    # The same header twice is ambiguous, even when both agree.
    body, headers = _binary_request(model_io[0], images[0].ravel())
    twice = client.post(url, content=body, headers=[*headers.items(), *headers.items()])
    assert twice.status_code == 400 and "2 times" in twice.json()["error"], twice.text
    # A flag that is not a boolean is a 422, as any other invalid value.
    length = int(headers["Inference-Header-Content-Length"])
    head = json.dumps({**json.loads(body[:length]), "parameters": {"binary_data_output": "yes"}}).encode()
    flagged = client.post(
        url, content=head + body[length:], headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert flagged.status_code == 422 and "true or false" in flagged.json()["error"], flagged.text
    assert_still_serving(client, served_model, images, expected)


def test_v2_content_types(
    client: httpx.Client, served_model: ServedModel, model_io: tuple[str, str], images: np.ndarray
) -> None:
    """A missing Content-Type is JSON (tritonclient sends none); a wrong explicit one is still a 415."""
    url = f"/v2/models/{served_model.name}/infer"
    tensor = {"name": model_io[0], "shape": [1, 784], "datatype": "UINT8", "data": images[0].ravel().tolist()}
    content = json.dumps({"inputs": [tensor]}).encode()
    missing = client.post(url, content=content)
    assert "content-type" not in missing.request.headers
    assert missing.status_code == 200, missing.text
    for media, status in [
        ("application/json; charset=utf-8", 200),
        ("application/vnd.api+json", 200),
        ("text/plain", 415),
        # octet-stream is for a binary body, which only Inference-Header-Content-Length announces.
        ("application/octet-stream", 415),
    ]:
        response = client.post(url, content=content, headers={"Content-Type": media})
        assert response.status_code == status, (media, response.text)
    body, headers = _binary_request(model_io[0], images[0].ravel())
    wrong = client.post(url, content=body, headers={**headers, "Content-Type": "image/png"})
    assert wrong.status_code == 415 and "Inference-Header-Content-Length" in wrong.json()["error"]


def assert_still_serving(
    client: httpx.Client, served_model: ServedModel, images: np.ndarray, expected: dict[str, Any]
) -> None:
    response = client.post("/predict", json={"pixels": images[0].tolist()})
    assert response.status_code == 200 and response.json()["digit"] == expected["digits"][0]


# --- 413 for clients that send the body without waiting for 100 Continue ------------------------------

SMALL_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_limit_server(
    served_model: ServedModel, serving_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingProcess]:
    """A server with a 64 KiB body limit, so bodies far beyond it stay cheap to send."""
    server = ServingProcess.start(
        tmp_path_factory.mktemp("small-limit"),
        tracking_uri=served_model.tracking_uri,
        model_uri=served_model.pinned_uri,
        cache_dir=serving_cache_dir,
        env={"SERVING_MAX_BODY_BYTES": str(SMALL_LIMIT), "SERVING_WARMUP_RUNS": "0"},
    )
    yield server
    server.stop()
    assert "unhandled error" not in server.log_text(), server.log_tail(200)


def _zeros(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        size = min(chunk, total - sent)
        sent += size
        yield b"0" * size


def _urllib_post(url: str, total: int, *, declare: bool) -> urllib.error.HTTPError:
    """urllib sends all of the body before it reads a byte of the answer; the answer must be the 413."""
    headers = {"Content-Type": "application/json"}
    if declare:
        headers["Content-Length"] = str(total)
    request = urllib.request.Request(url, data=_zeros(total), headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    return caught.value


def _read_response(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed before answering: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed mid-body"
        rest += chunk
    return status, headers, rest


def test_over_limit_body_without_expect_gets_413(small_limit_server: ServingProcess) -> None:
    url = small_limit_server.url + "/predict"
    # Past 16x the limit the server used to answer and close on the unread body: the client saw a
    # reset or a broken pipe, the 413 only when the kernel's buffers happened to hold all of it.
    sizes = [
        (SMALL_LIMIT + 1, True),
        *((n * SMALL_LIMIT, True) for n in (17, 40, 63)),
        (8 * SMALL_LIMIT, False),
    ]
    for total, declare in sizes:
        error = _urllib_post(url, total, declare=declare)
        assert error.code == 413, (total, declare)
        assert f"larger than {SMALL_LIMIT} bytes" in json.loads(error.read())["error"]

    # The refused body was read to its end, so the connection still frames requests correctly.
    host, port = urlsplit(small_limit_server.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        total = 4 * SMALL_LIMIT
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % total
        )
        for chunk in _zeros(total):
            sock.sendall(chunk)
        status, headers, _ = _read_response(sock)
        assert status.startswith("HTTP/1.1 413"), status
        assert headers.get("connection") != "close"
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _read_response(sock)
        assert status.startswith("HTTP/1.1 200") and json.loads(body) == {"status": "alive"}


def test_over_limit_body_with_expect_is_refused_before_upload(small_limit_server: ServingProcess) -> None:
    """With `Expect: 100-continue` the client waits: the 413 comes instead of `100 Continue`, and the
    connection closes since the body will never come."""
    host, port = urlsplit(small_limit_server.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (2 * SMALL_LIMIT)
        )
        status, headers, body = _read_response(sock)
        assert status.startswith("HTTP/1.1 413"), status
        assert headers["connection"] == "close"
        assert f"larger than {SMALL_LIMIT} bytes" in json.loads(body)["error"]
        assert sock.recv(1024) == b""


def test_far_over_limit_body_is_not_read(small_limit_server: ServingProcess) -> None:
    """Beyond the drain bound the server closes rather than take the upload; it keeps serving."""
    host, port = urlsplit(small_limit_server.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (1024 * SMALL_LIMIT)
        )
        status, headers, _ = _read_response(sock)
        assert status.startswith("HTTP/1.1 413") and headers["connection"] == "close"
    assert httpx.get(small_limit_server.url + "/health/live", timeout=10).status_code == 200
