"""Request and response bodies of the REST API (the `/predict` family and the Open Inference Protocol).

Numbers are strict: a string where a pixel belongs is an error, not a number parsed on our behalf,
and NaN or infinity are refused (JSON has neither, but lenient encoders emit them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Pixel = Annotated[float, Field(strict=True, ge=0, le=255, allow_inf_nan=False)]
PixelRow = Annotated[list[Pixel], Field(min_length=28, max_length=28)]
PixelGrid = Annotated[list[PixelRow], Field(min_length=28, max_length=28)]
Probabilities = Annotated[list[float], Field(min_length=10, max_length=10)]


class Instance(BaseModel):
    """One digit: either an encoded image or a 28x28 pixel array."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = Field(
        None,
        description=(
            "Base64 of a PNG, JPEG or WebP image of any size and mode (a `data:image/...;base64,` "
            "prefix is accepted). It is cropped to the digit, scaled into 20x20 and centred by mass in "
            "28x28 like MNIST; dark-on-light images are inverted."
        ),
        max_length=64 * 1024 * 1024,
    )
    pixels: PixelGrid | None = Field(
        None,
        description=(
            "28 rows of 28 numbers laid out like MNIST (digit centred, 20x20 box), 0..255 or 0..1 "
            "(an array whose maximum is at most 1 is taken as 0..1). Dark-on-light arrays are inverted."
        ),
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Instance:
        if (self.image is None) == (self.pixels is None):
            raise ValueError("give exactly one of 'image' (base64) or 'pixels' (28x28 array)")
        return self


class PredictRequest(Instance):
    pass


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    instances: list[Instance] = Field(
        ..., min_length=1, description="The digits; at most SERVING_MAX_BATCH_SIZE (default 256) per request."
    )


class Prediction(BaseModel):
    digit: int = Field(..., ge=0, le=9)
    confidence: float = Field(..., ge=0, le=1, description="Probability of `digit`.")
    probabilities: Probabilities = Field(..., description="Probability of each digit 0..9.")
    inverted: bool = Field(..., description="The input was dark-on-light and was inverted.")


class PredictResponse(Prediction):
    model_name: str
    model_version: str
    request_id: str
    latency_ms: float = Field(..., description="Server-side time spent on this request.")


class BatchResponse(BaseModel):
    predictions: list[Prediction]
    model_name: str
    model_version: str
    request_id: str
    latency_ms: float


class ErrorResponse(BaseModel):
    error: str
    request_id: str | None = None
    detail: list[dict[str, Any]] | None = None


class ModelStatus(BaseModel):
    name: str
    version: str | None
    alias: str | None
    uri: str
    # float32, the registered model, or int8, the one quantised from it (SERVING_MODEL_PRECISION).
    precision: Literal["float32", "int8"] = "float32"
    state: Literal["loading", "ready"]
    loaded_from_cache: bool | None = None
    load_seconds: float | None = None
    last_error: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class TrafficStatus(BaseModel):
    """The registry's traffic document (canary or shadow rollout) as this server applies it."""

    state: Literal["none", "loading", "applied", "failed"] = Field(
        ...,
        description=(
            "none: every request on the stable version; loading: the candidate is being fetched (stable "
            "answers meanwhile); applied: the document is in force; failed: the candidate could not be "
            "loaded (retried) or the document is malformed (ignored): `error` says which."
        ),
    )
    stable: str | None = Field(None, description="This server's own, pinned version.")
    mode: Literal["canary", "shadow"] | None = None
    candidate: str | None = None
    weight: float | None = Field(None, description="Percent of requests the candidate answers (canary).")
    rollout: str | None = Field(None, description="<namespace>/<trainingrun> of the rollout.")
    step: int | None = None
    error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "loading"]
    model: ModelStatus
    traffic: TrafficStatus
    uptime_seconds: float
    pid: int


class LiveResponse(BaseModel):
    status: Literal["alive"]


class ReadyResponse(BaseModel):
    status: Literal["ready", "not ready"]
    model_version: str | None = None
    reason: str | None = None


# --- Open Inference Protocol (KServe v2) -----------------------------------------------------------

V2Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., max_length=256)
    shape: list[Annotated[int, Field(strict=True, ge=0)]] = Field(..., max_length=8)
    datatype: V2Datatype
    parameters: dict[str, Any] | None = Field(
        None,
        description=(
            "`binary_data_size`: the tensor is sent as that many little-endian bytes after the JSON "
            "(binary tensor data extension) instead of in `data`."
        ),
    )
    data: list[Any] | None = Field(
        None, description="Row-major tensor contents, flat or nested; absent for a binary tensor."
    )


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data`: return this output as binary tensor data (default: the request's)."
    )


class V2InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256)
    # KServe's client repeats the model's name in the body; the path is what selects the model.
    model_name: str | None = Field(None, max_length=256, description="Ignored: the path names the model.")
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_output`: return every output as binary tensor data."
    )
    inputs: list[V2Tensor] = Field(..., min_length=1, max_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(
        None, description="Absent when the output follows the JSON as binary data (binary_data_size)."
    )
    parameters: dict[str, Any] | None = None


class V2InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    parameters: dict[str, Any] | None = None
    outputs: list[V2OutputTensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


# --- Explanations and the live WebSocket ----------------------------------------------------------

UnitGrid = Annotated[list[list[float]], Field(min_length=28, max_length=28)]


class ExplainResponse(PredictResponse):
    saliency: UnitGrid = Field(
        ...,
        description=(
            "28x28 occlusion sensitivity over `input`: the mean drop of `digit`'s probability when a "
            "patch covering the pixel is blacked out (negative where hiding it made the digit likelier)."
        ),
    )
    input: UnitGrid = Field(..., description="The 28x28 image the model saw (0..1, white digit on black).")
    patch: int = Field(..., description="Side of the occluding square, in pixels of `input`.")
    stride: int


class LiveRequest(Instance):
    """One frame on `/ws/predict`: a `/predict` body, plus an id echoed in the answer and whether to
    explain it."""

    id: int | str | None = Field(None, description="Echoed in the answer, to match answers to frames.")
    explain: bool = Field(False, description="Add `saliency` and `input` as in `POST /explain`.")
