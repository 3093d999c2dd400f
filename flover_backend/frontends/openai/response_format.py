"""OpenAI's `response_format`: text, any JSON object, or JSON under a schema, as the engine's guided_json."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flover_backend.frontends.openai.errors import bad_request
from flover_backend.sampling.structured_output import ANY_JSON_OBJECT, MAX_SCHEMA_BYTES

# The engine's keys that a response_format becomes; their errors are reported as response_format's.
GUIDED_KEYS = ("guided_json", "guided_regex", "guided_choice")


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: a named schema the answer must follow."""

    # strict: 1 is not a boolean; forbid: a field we don't know is an error (as every request body here)
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=4096)
    # `schema` would shadow BaseModel.schema(): the field is named schema_ and read from "schema".
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the grammar always holds the answer to the schema, strict or not


class ResponseFormat(BaseModel):
    """`response_format`: {"type": "text"} (free text), "json_object" or "json_schema"."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def sampling_parameters(self) -> dict[str, Any]:
        """The engine's guided_* key for this format (none for text), the schema's size bounded here already:
        Triton's `sampling_parameters` input has a bound of its own that would otherwise answer first."""
        if self.type == "json_schema" and self.json_schema is None:
            raise bad_request("response_format", "type json_schema needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise bad_request("response_format", f"json_schema is only allowed with type json_schema, not "
                                                 f"{self.type}")
        if self.type == "text":
            return {}
        # json_object, or a json_schema without a schema: any JSON object.
        schema = ANY_JSON_OBJECT if self.type == "json_object" else self.json_schema.schema_ or ANY_JSON_OBJECT
        size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        if size > MAX_SCHEMA_BYTES:
            raise bad_request("response_format", f"the schema is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES}")
        return {"guided_json": schema}
