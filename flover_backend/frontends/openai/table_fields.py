"""The OpenAI request fields that the parameter table declares, as a pydantic base model with its bounds."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, create_model

from flover_backend.param_table import ENGINE_DEFAULT, PARAMS, Param


def _bounds(param: Param) -> dict[str, Any]:
    """pydantic's constraint arguments for the table's bounds."""
    bounds = {}
    if param.low is not None:
        bounds["gt" if param.low_open else "ge"] = param.low
    if param.high is not None:
        bounds["lt" if param.high_open else "le"] = param.high
    if param.max_chars is not None:
        bounds |= {"min_length": 1, "max_length": param.max_chars}
    return bounds


def _field(param: Param) -> tuple[Any, Any]:
    """(annotation, default) of the field: null (absent) means the default, as in OpenAI's API."""
    item = Annotated[param.kind, Field(**_bounds(param))]
    if not param.is_list:
        return item | None, None
    # A list field takes one value too, as OpenAI's `stop` ("\n" or ["\n", "."]).
    return item | Annotated[list[item], Field(max_length=param.max_items)] | None, None


def table_fields(params: tuple[Param, ...]) -> type[BaseModel]:
    """A pydantic model with one optional field per table row that OpenAI's bodies carry, and the mapping back."""
    offered = [param for param in params if param.openai]
    fields = {param.openai: _field(param) for param in offered}

    def engine_values(self) -> dict[str, Any]:
        """The engine's settings (by engine name) that this body gives, OpenAI's defaults filled in where they
        differ from the engine's (temperature 1: see the table)."""
        values = {}
        for param in offered:
            value = getattr(self, param.openai)
            if value is None and param.openai_default not in (ENGINE_DEFAULT, None):
                value = param.openai_default
            if value is not None:
                values[param.name] = [value] if param.is_list and not isinstance(value, list) else value
        return values

    model = create_model("TableFields", **fields)
    model.engine_values = engine_values
    return model


TableFields = table_fields(PARAMS)
