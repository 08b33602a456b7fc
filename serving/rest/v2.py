"""REST adapter for the Open Inference Protocol (KServe v2), so KServe and Triton clients work unchanged.

Every model route exists unversioned and under `/versions/{version}`; one handler serves both paths
(the version, when present, must be a served one: the stable version, or during a canary or shadow
rollout the candidate, which then answers the request itself). The tensor encoding is `serving.codec`'s, with
the binary tensor data extension: tensors as raw bytes after a JSON header whose length the
`Inference-Header-Content-Length` header gives, both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import __version__, codec, context, tracing
from serving.dataplane import Batch, DataPlane, Inference
from serving.model import NUM_CLASSES
from serving.rest.http import (
    ERROR_RESPONSES,
    RawRoute,
    Responses,
    is_json,
    json_body_spec,
    json_response,
    media_type,
    path_parameters,
    run,
    unsupported_media,
)
from serving.schemas import (
    ErrorResponse,
    V2InferenceRequest,
    V2InferenceResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    V2TensorMetadata,
)

PREFIX = "/v2"
SERVER_NAME = "mnist-serving"
EXTENSIONS = ["binary_tensor_data"]
OCTET_STREAM = "application/octet-stream"
TAG = "open inference protocol (v2)"
NOT_FOUND: Responses = {404: {"model": ErrorResponse, "description": "No such model or version."}}
NOT_READY: Responses = {503: {"model": ErrorResponse, "description": "Not ready."}}
# FastAPI documents the path parameters a handler declares; `version` is read from the path instead
# (the unversioned path has none, and a declared optional one would become a query parameter).
_VERSION_PARAMETER = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"title": "Version", "type": "string"},
}
_BINARY_HEADER_PARAMETER = {
    "name": codec.BINARY_HEADER,
    "in": "header",
    "required": False,
    "description": "Length of the JSON part of a body whose binary tensor data follows it.",
    "schema": {"type": "integer", "minimum": 0},
}
_BINARY_RESPONSE: Responses = {
    200: {
        "description": (
            "JSON, or (when any output is requested as binary data) application/octet-stream: the "
            "JSON header, of the length the Inference-Header-Content-Length header gives, then the "
            "outputs' bytes."
        ),
        "content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _version(request: Request) -> str | None:
    version: str | None = request.path_params.get("version")
    return version


def _check_media(request: Request, binary: bool) -> None:
    media = media_type(request)
    # Triton's HTTP client sends no Content-Type at all; KServe's sends octet-stream with binary data.
    if not media or is_json(media) or (binary and media == OCTET_STREAM):
        return
    raise unsupported_media(media, f"application/json, or {OCTET_STREAM} with {codec.BINARY_HEADER}")


def _infer_response(content: bytes, header_length: int | None, headers: dict[str, str]) -> Response:
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[codec.BINARY_HEADER] = str(header_length)
    return Response(content, media_type=OCTET_STREAM, headers=headers)


def register(router: APIRouter, dataplane: DataPlane) -> None:
    limits = codec.Limits.from_settings(dataplane.settings)
    inline_max_bytes = dataplane.settings.inline_max_bytes

    async def server_metadata() -> V2ServerMetadata:
        return V2ServerMetadata(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def server_live() -> V2Live:
        return V2Live(live=True)

    async def server_ready() -> Response:
        ready = dataplane.ready
        return json_response({"ready": ready}, 200 if ready else 503)

    async def model_metadata(request: Request, name: str) -> V2ModelMetadata:
        dataplane.check_name(name, _version(request))
        model = dataplane.require_model()
        return V2ModelMetadata(
            name=dataplane.name,
            versions=dataplane.versions,
            platform="onnxruntime_onnx",
            inputs=[V2TensorMetadata(name=model.input_name, datatype="FP32", shape=[-1, *model.input_shape])],
            outputs=[
                V2TensorMetadata(name=model.output_name, datatype="FP32", shape=[-1, NUM_CLASSES]),
                V2TensorMetadata(name=codec.DIGIT_OUTPUT, datatype="INT64", shape=[-1]),
            ],
        )

    async def model_ready(request: Request, name: str) -> Response:
        dataplane.check_name(name, _version(request))
        ready = dataplane.ready
        return json_response({"name": dataplane.name, "ready": ready}, 200 if ready else 503)

    async def model_infer(request: Request) -> Response:
        params = request.path_params
        dataplane.check_name(params["name"], params.get("version"))
        body = await request.body()
        header_lengths = request.headers.getlist(codec.BINARY_HEADER)
        _check_media(request, bool(header_lengths))
        ctx = context.current()

        def work() -> tuple[Batch, Callable[[Inference], tuple[bytes, int | None]]]:
            with tracing.decode():
                header, tail = codec.split_binary_body(body, header_lengths)
                parsed = V2InferenceRequest.model_validate_json(header)
                model = dataplane.require_model()
                raw = codec.binary_inputs(parsed.inputs, tail)
                requested = codec.requested_v2_outputs(parsed, model.output_name)
                batch = codec.decode_v2_input(parsed.inputs[0], model.input_name, limits, raw[0])

            def encode(result: Inference) -> tuple[bytes, int | None]:
                head = {
                    "model_name": dataplane.name,
                    "model_version": result.version,
                    "id": parsed.id if parsed.id is not None else ctx.request_id,
                }
                return codec.encode_v2_response(head, result, requested, model.output_name)

            return batch, encode

        # Decoding may take a worker thread; the model call joins the batcher on the event loop.
        batch, encode = await run(body, inline_max_bytes, work)
        result = await dataplane.infer_async(
            batch,
            "v2_infer",
            ctx.started,
            key=dataplane.routing_key(request),
            version=params.get("version"),
        )
        return _infer_response(*encode(result), dataplane.answered_by(result) or {})

    def get(path: str, endpoint: Callable[..., Any], name: str, summary: str, **kwargs: Any) -> None:
        router.add_api_route(
            PREFIX + path, endpoint, methods=["GET"], name=name, summary=summary, tags=[TAG], **kwargs
        )

    def post_infer(path: str, name: str, summary: str, parameters: list[dict[str, Any]]) -> None:
        router.add_api_route(
            PREFIX + path,
            model_infer,
            methods=["POST"],
            route_class_override=RawRoute,
            name=name,
            summary=summary,
            tags=[TAG],
            response_model=V2InferenceResponse,
            responses={**ERROR_RESPONSES, **NOT_FOUND, **_BINARY_RESPONSE},
            openapi_extra={
                **json_body_spec("V2InferenceRequest", (OCTET_STREAM,)),
                "parameters": [*parameters, _BINARY_HEADER_PARAMETER],
            },
        )

    # Each path keeps its own route name: the names are the OpenAPI operation ids' stems.
    metadata: dict[str, Any] = {"response_model": V2ModelMetadata, "responses": {**NOT_FOUND, **NOT_READY}}
    ready: dict[str, Any] = {
        "response_model": V2ModelReady,
        "responses": {**NOT_FOUND, 503: {"model": V2ModelReady}},
    }
    versioned = {"parameters": [_VERSION_PARAMETER]}
    get("", server_metadata, "server_metadata", "Server metadata", response_model=V2ServerMetadata)
    get("/health/live", server_live, "server_live", "Server live", response_model=V2Live)
    get(
        "/health/ready",
        server_ready,
        "server_ready",
        "Server ready",
        response_model=V2Ready,
        responses={503: {"model": V2Ready}},
    )
    get("/models/{name}", model_metadata, "model_metadata", "Model metadata", **metadata)
    get(
        "/models/{name}/versions/{version}",
        model_metadata,
        "model_version_metadata",
        "Model version metadata",
        openapi_extra=versioned,
        **metadata,
    )
    get("/models/{name}/ready", model_ready, "model_ready", "Model ready", **ready)
    get(
        "/models/{name}/versions/{version}/ready",
        model_ready,
        "model_version_ready",
        "Model version ready",
        openapi_extra=versioned,
        **ready,
    )
    post_infer("/models/{name}/infer", "model_infer", "Inference", path_parameters("name"))
    post_infer(
        "/models/{name}/versions/{version}/infer",
        "model_version_infer",
        "Inference on a given version",
        path_parameters("name", "version"),
    )
