"""REST adapter for the Open Inference Protocol (KServe v2), so KServe and Triton clients work unchanged.

The model takes one tensor, FP32 in [0,1] or UINT8 in [0,255], shaped [N,28,28], [N,28,28,1] or
[N,784]; it answers the model's own output (probabilities, FP32 [N,10]) and `predicted_digit`
(INT64 [N]). No preprocessing beyond scaling: v2 clients send model-ready tensors.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import __version__
from serving.dataplane import DIGIT_OUTPUT, DataPlane, Inference
from serving.errors import InvalidInputError, UnsupportedMediaTypeError
from serving.model import NUM_CLASSES
from serving.rest_predict import (
    ERROR_RESPONSES,
    fast_path,
    is_json,
    json_body_spec,
    json_response,
    media_type,
    path_parameters,
    run,
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

SERVER_NAME = "mnist-serving"
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such model or version."}
}
NOT_READY: dict[int | str, dict[str, Any]] = {503: {"model": ErrorResponse, "description": "Not ready."}}


def build_router(dataplane: DataPlane) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

    @router.get("", response_model=V2ServerMetadata, summary="Server metadata")
    async def server_metadata() -> V2ServerMetadata:
        return V2ServerMetadata(name=SERVER_NAME, version=__version__, extensions=[])

    @router.get("/health/live", response_model=V2Live, summary="Server live")
    async def server_live() -> V2Live:
        return V2Live(live=True)

    @router.get(
        "/health/ready", response_model=V2Ready, responses={503: {"model": V2Ready}}, summary="Server ready"
    )
    async def server_ready() -> Response:
        ready = dataplane.ready
        return json_response_status({"ready": ready}, 200 if ready else 503)

    def metadata(name: str, version: str | None) -> V2ModelMetadata:
        dataplane.check_name(name, version)
        model = dataplane.require_model()
        return V2ModelMetadata(
            name=dataplane.name,
            versions=[dataplane.version] if dataplane.version else [],
            platform="onnxruntime_onnx",
            inputs=[V2TensorMetadata(name=model.input_name, datatype="FP32", shape=[-1, *model.input_shape])],
            outputs=[
                V2TensorMetadata(name=model.output_name, datatype="FP32", shape=[-1, NUM_CLASSES]),
                V2TensorMetadata(name=DIGIT_OUTPUT, datatype="INT64", shape=[-1]),
            ],
        )

    def ready(name: str, version: str | None) -> Response:
        dataplane.check_name(name, version)
        is_ready = dataplane.ready
        return json_response_status({"name": dataplane.name, "ready": is_ready}, 200 if is_ready else 503)

    async def infer(request: Request, name: str, version: str | None) -> Response:
        dataplane.check_name(name, version)
        body = await request.body()
        media = media_type(request)
        if not is_json(media):
            raise UnsupportedMediaTypeError(
                f"Content-Type {media or '(none)'!r} is not supported; send application/json"
            )
        start: float = request.scope["mnist.start"]
        parsed_holder: list[V2InferenceRequest] = []

        def work() -> Inference:
            parsed = V2InferenceRequest.model_validate_json(body)
            parsed_holder.append(parsed)
            return dataplane.infer_tensor(parsed.inputs[0], start)

        result = await run(dataplane, body, work)
        parsed = parsed_holder[0]
        model = dataplane.require_model()
        wanted = [o.name for o in parsed.outputs] if parsed.outputs else [model.output_name, DIGIT_OUTPUT]
        count = len(result.digits)
        outputs: list[dict[str, Any]] = []
        for output in wanted:
            if output == model.output_name:
                outputs.append(
                    {
                        "name": output,
                        "shape": [count, NUM_CLASSES],
                        "datatype": "FP32",
                        "data": [p for row in result.probabilities for p in row],
                    }
                )
            elif output == DIGIT_OUTPUT:
                outputs.append({"name": output, "shape": [count], "datatype": "INT64", "data": result.digits})
            else:
                raise InvalidInputError(
                    f"unknown output {output!r}; outputs are {model.output_name!r} and {DIGIT_OUTPUT!r}"
                )
        return json_response(
            {
                "model_name": dataplane.name,
                "model_version": dataplane.version,
                "id": parsed.id if parsed.id is not None else request.scope["mnist.request_id"],
                "outputs": outputs,
            }
        )

    responses = {**NOT_FOUND, **NOT_READY}
    infer_responses = {**ERROR_RESPONSES, **NOT_FOUND}
    infer_body = json_body_spec("V2InferenceRequest", images=False)

    @router.get(
        "/models/{name}", response_model=V2ModelMetadata, responses=responses, summary="Model metadata"
    )
    async def model_metadata(name: str) -> V2ModelMetadata:
        return metadata(name, None)

    @router.get(
        "/models/{name}/versions/{version}",
        response_model=V2ModelMetadata,
        responses=responses,
        summary="Model version metadata",
    )
    async def model_version_metadata(name: str, version: str) -> V2ModelMetadata:
        return metadata(name, version)

    @router.get(
        "/models/{name}/ready",
        response_model=V2ModelReady,
        responses={**NOT_FOUND, 503: {"model": V2ModelReady}},
        summary="Model ready",
    )
    async def model_ready(name: str) -> Response:
        return ready(name, None)

    @router.get(
        "/models/{name}/versions/{version}/ready",
        response_model=V2ModelReady,
        responses={**NOT_FOUND, 503: {"model": V2ModelReady}},
        summary="Model version ready",
    )
    async def model_version_ready(name: str, version: str) -> Response:
        return ready(name, version)

    @router.post(
        "/models/{name}/infer",
        response_model=V2InferenceResponse,
        responses=infer_responses,
        openapi_extra={**infer_body, "parameters": path_parameters("name")},
        summary="Inference",
    )
    @fast_path
    async def model_infer(request: Request) -> Response:
        return await infer(request, request.path_params["name"], None)

    @router.post(
        "/models/{name}/versions/{version}/infer",
        response_model=V2InferenceResponse,
        responses=infer_responses,
        openapi_extra={**infer_body, "parameters": path_parameters("name", "version")},
        summary="Inference on a given version",
    )
    @fast_path
    async def model_version_infer(request: Request) -> Response:
        params = request.path_params
        return await infer(request, params["name"], params["version"])

    return router


def json_response_status(content: dict[str, Any], status: int) -> Response:
    response = json_response(content)
    response.status_code = status
    return response
