"""ctr_farm: the Python client of the ctr-farm ranking service (see :mod:`ctr_farm.client`)."""

from ctr_farm.client import (
    APIError,
    AsyncClient,
    BadRequest,
    Client,
    CtrFarmError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PredictResponse,
    RankResponse,
    RequestTimeout,
    ServerError,
    TooManyRequests,
    TransportError,
    Unavailable,
    UnsupportedMediaType,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "CtrFarmError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PredictResponse",
    "RankResponse",
    "RequestTimeout",
    "ServerError",
    "TooManyRequests",
    "TransportError",
    "Unavailable",
    "UnsupportedMediaType",
]
