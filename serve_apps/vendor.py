"""A name in a vendor package (vLLM, Ray) that packserve relies on without the vendor promising to keep it.

Each vendor's seam (serve_apps/engines/vllm/compat.py, serve_apps/deploy/ray_compat.py)
lists its names as `VendorName`s; tests/test_vendor_compat.py checks every one
against the installed release.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VendorName:
    """`module`'s attribute `path` (dotted: `Class.method`), and what packserve relies on in it."""

    module: str
    path: str
    # Parameter names the callable must accept (its signature's names, in any order).
    params: tuple[str, ...] = ()
    # Attributes packserve reads or sets on instances: a class attribute, or assigned (`self.NAME`) in its source.
    attrs: tuple[str, ...] = ()
    # Fields of a dataclass / pydantic model packserve passes by name.
    fields: tuple[str, ...] = ()

    def load(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.path.split("."):
            obj = getattr(obj, part)
        return obj

    def problems(self) -> list[str]:
        """What no longer matches in the installed vendor package (empty: all of it is there)."""
        try:
            obj = self.load()
        except (ImportError, AttributeError) as exc:
            return [f"{self.module}.{self.path}: {exc}"]
        out: list[str] = []
        if self.params:
            names = set(inspect.signature(obj).parameters)
            out += [f"{self.module}.{self.path}: no parameter {p!r}" for p in self.params if p not in names]
        if self.attrs:
            source = inspect.getsource(obj)
            out += [f"{self.module}.{self.path}: has no attribute {a!r}" for a in self.attrs
                    if not hasattr(obj, a) and f"self.{a}" not in source]
        if self.fields:
            known = set(getattr(obj, "model_fields", None) or getattr(obj, "__dataclass_fields__", {}))
            out += [f"{self.module}.{self.path}: no field {f!r}" for f in self.fields if f not in known]
        return out
