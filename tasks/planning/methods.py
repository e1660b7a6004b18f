"""The training methods, one enum everywhere: what the config asks for, what the planner picks, what ran."""
from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    """How a run trains, listed by quality: every weight (full), low-rank adapters on the frozen base
    (lora), or those adapters on a 4-bit quantized base (qlora)."""
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"

    def __str__(self) -> str:  # f-strings, logs and tables show "lora", not "Method.LORA"
        return self.value

    @property
    def trains_adapter(self) -> bool:
        return self is not Method.FULL

    @property
    def quantized(self) -> bool:
        return self is Method.QLORA


class MethodChoice(str, Enum):
    """What the config asks for: a method, or "auto" to let the planner pick the best that fits."""
    AUTO = "auto"
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"

    def __str__(self) -> str:
        return self.value

    def fixed(self) -> Method | None:
        """The method forced by the config, or None for auto."""
        return None if self is MethodChoice.AUTO else Method(self.value)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        # The Prefect UI labels a field with its type's title: "Method", as the field is named.
        schema = handler(core_schema)
        handler.resolve_ref_schema(schema)["title"] = "Method"
        return schema
