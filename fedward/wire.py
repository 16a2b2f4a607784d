"""The typed protocol messages of cross-site mode, as JSON: data in, data out, never code.

Every value a driver and a hospital's service exchange is one of: None, a bool, a finite or
non-finite number, a string, a list, a tuple, a mapping, bytes, a numeric numpy array, or one of
the protocol's own frozen dataclasses (`MESSAGE_MODULES`), each encoded as a JSON value. Decoding
builds only those: an unknown type name, an array of objects or a field a dataclass does not have
is refused, so nothing a peer sends can name code to run.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
from blake3 import blake3

from fedward.errors import FedwardError

MESSAGE_MODULES = (
    "fedward.types", "fedward.release", "fedward.pooling", "fedward.privacy.masking", "fedward.privacy.ckks",
    "fedward.data_adapters.harmonize", "fedward.explain.summary",
)
NUMERIC_KINDS = "biuf"  # booleans, integers, unsigned integers, floats


class WireError(FedwardError):
    """A message that is not a protocol message."""


@cache
def message_types() -> dict[str, type]:
    """The protocol's dataclasses by name: the public ones of MESSAGE_MODULES."""
    types: dict[str, type] = {}
    for name in MESSAGE_MODULES:
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if dataclasses.is_dataclass(value) and isinstance(value, type) and value.__module__ == name and not attribute.startswith("_"):
                if types.setdefault(attribute, value) is not value:
                    raise WireError(f"two protocol messages are named {attribute}: in {types[attribute].__module__} and {name}")
    return types


def encode(value: Any, blob: Callable[[bytes], str] | None = None) -> Any:
    """`value` as a JSON value; arrays and byte strings as base64, or as `blob` writes them."""
    blob = blob or (lambda raw: base64.b64encode(raw).decode())
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
    if isinstance(value, bytes):
        return {"$bytes": blob(value)}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in NUMERIC_KINDS:
            raise WireError(f"an array of {value.dtype} is not a protocol message")
        array = np.ascontiguousarray(value)
        return {"$array": blob(array.tobytes()), "dtype": array.dtype.str, "shape": list(array.shape)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if message_types().get(name) is not type(value):
            raise WireError(f"{type(value).__module__}.{name} is not a protocol message")
        return {"$type": name, "fields": {f.name: encode(getattr(value, f.name), blob) for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, blob) for v in value]}
    if isinstance(value, list):
        return [encode(v, blob) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, blob) for k, v in value.items()}
        return {"$map": [[encode(k, blob), encode(v, blob)] for k, v in value.items()]}
    raise WireError(f"a {type(value).__name__} is not a protocol message")


def digest(value: Any) -> tuple[str, int]:
    """A message's BLAKE3 digest and its size in bytes, computed from its values: its JSON form
    with each array and byte string replaced by that content's own digest. Either side can name a
    message this way without base64-encoding an update."""
    size = 0

    def hashed(raw: bytes) -> str:
        nonlocal size
        size += len(raw)
        return blake3(raw).hexdigest()

    text = json.dumps(encode(value, hashed), sort_keys=True, allow_nan=False).encode()
    return blake3(text).hexdigest(), size + len(text)


def decode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        raise WireError(f"a JSON {type(value).__name__} is not a protocol message")
    if "$float" in value:
        if value["$float"] not in ("nan", "inf", "-inf"):
            raise WireError(f"$float: expected nan, inf or -inf, got {value['$float']!r}")
        return float(value["$float"])
    if "$bytes" in value:
        return _base64(value["$bytes"])
    if "$array" in value:
        dtype = np.dtype(value.get("dtype"))
        shape = value.get("shape")
        if dtype.kind not in NUMERIC_KINDS or not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise WireError(f"$array: expected a numeric dtype and a shape, got {value.get('dtype')!r} and {shape!r}")
        data = _base64(value["$array"])
        if len(data) != dtype.itemsize * math.prod(shape):
            raise WireError(f"$array: {len(data)} bytes do not hold {shape} values of {dtype}")
        return np.frombuffer(data, dtype).reshape(shape).copy()
    if "$type" in value:
        cls = message_types().get(value["$type"])
        fields = value.get("fields")
        if cls is None or not isinstance(fields, dict):
            raise WireError(f"$type: {value['$type']!r} is not a protocol message")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(fields) - known):
            raise WireError(f"{value['$type']}: unknown field(s) {unknown}")
        try:
            return cls(**{k: decode(v) for k, v in fields.items()})
        except TypeError as e:
            raise WireError(f"{value['$type']}: {e}") from None
    if "$tuple" in value:
        return tuple(decode(v) for v in value["$tuple"])
    if "$map" in value:
        return {decode(k): decode(v) for k, v in value["$map"]}
    return {k: decode(v) for k, v in value.items()}


def _base64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise WireError(f"expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise WireError("invalid base64") from None
