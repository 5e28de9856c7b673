"""Response and request bodies of the HTTP contract (they document the OpenAPI schema).

Handlers build plain dicts of exactly these shapes and serialise them with orjson; the models
here are what ``/docs`` and ``/openapi.json`` (and schemathesis) see.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    detail: str = Field(description="human-readable reason")


class ValidationErrorResponse(ErrorResponse):
    errors: list[dict[str, Any]] = Field(default_factory=list, description="field errors")


class Prediction(BaseModel):
    label: str
    class_id: int
    confidence: float = Field(ge=0.0, le=1.0)


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction] = Field(description="one entry per image, in request order")


class TopKEntry(BaseModel):
    topk: list[Prediction] = Field(description="sorted by confidence, descending")


class TopKResponse(BaseModel):
    model: str
    version: str
    predictions: list[TopKEntry]


class ModelInfo(BaseModel):
    """One model version; a failed one has ``status: failed``, an ``error`` and null fields."""

    name: str | None
    version: str | None
    arch: str | None
    num_classes: int | None
    labels: list[str] | None
    input_size: list[int] | None
    default: bool
    status: Literal["ready", "loading", "failed", "unloaded"]
    error: str | None = None
    metrics: dict[str, Any] | None = None
    file: str | None = None
    device: str | None = None
    precision: str | None = None
    created: str | None = None
    sha256: str | None = None
    load_seconds: float | None = None


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    default_model: str | None = None
    detail: str | None = Field(None, description="why the service is not ready, when it is not")


class ModelVersions(BaseModel):
    name: str
    default_version: str | None
    versions: list[ModelInfo]


class ExplainResponse(BaseModel):
    model: str
    version: str
    label: str
    class_id: int
    confidence: float = Field(ge=0.0, le=1.0)
    heatmap: list[list[float]] = Field(description="rows x cols at the model's input size, 0..1")


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="file name of a .mar archive already in MODEL_STORE")


class DefaultVersionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    version: str = Field(description="the version that answers when none is asked for")


class UnloadResponse(BaseModel):
    name: str
    version: str
    status: Literal["unloaded"]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    model: str
    version: str
    detail: str
