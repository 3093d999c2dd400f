"""The flover models' Triton inputs and outputs, declared once: parsing, the adapter and auto_complete_config read this."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flover_backend.param_table import PARAMS

# Which Python type each Triton data type arrives as, once taken out of its NumPy array, and its NumPy dtype.
PYTHON_TYPES = {"TYPE_STRING": str, "TYPE_INT32": int, "TYPE_INT64": int, "TYPE_FP32": float, "TYPE_BOOL": bool}
NUMPY_TYPES = {"TYPE_STRING": np.object_, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_FP32": np.float32,
               "TYPE_BOOL": np.bool_}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of config.pbtxt: its name, Triton data type and shape."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    @property
    def is_list(self) -> bool:
        """Whether it holds any number of values (dims [-1]) rather than exactly one."""
        return self.dims == (-1,)

    @property
    def python_type(self) -> type:
        """The type of each of its values in Python."""
        return PYTHON_TYPES[self.data_type]

    def as_config(self, optional: bool) -> dict:
        """This tensor as a config.pbtxt entry (the dict `auto_complete_config` adds)."""
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)} | (
            {"optional": True} if optional else {})


# Every input is optional. The prompt is text_input or input_ids; the rest set SamplingParams fields of
# the same name (SAMPLING_INPUTS, from the parameter table) or say how to answer (RESPONSE_INPUTS).
PROMPT_INPUTS = (TensorSpec("text_input", "TYPE_STRING", (1,)), TensorSpec("input_ids", "TYPE_INT32", (-1,)))
SAMPLING_INPUTS = tuple(TensorSpec(p.name, p.triton, (-1,) if p.is_list else (1,)) for p in PARAMS if p.triton)
# As vllm_backend's: stream (absent: false, one response), exclude_input_in_output, and flags that ask for the
# outputs of the same names. The number of alternatives per token is `logprobs` in sampling_parameters only (a
# tensor of that name would shadow the output).
RESPONSE_FLAGS = ("stream", "exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
                  "return_num_output_tokens", "return_logprobs", "return_cumulative_logprob")
RESPONSE_INPUTS = tuple(TensorSpec(name, "TYPE_BOOL", (1,)) for name in RESPONSE_FLAGS)
JSON_INPUT = TensorSpec("sampling_parameters", "TYPE_STRING", (1,))  # any SamplingParams fields, as JSON
INPUTS = (*PROMPT_INPUTS, *SAMPLING_INPUTS, *RESPONSE_INPUTS, JSON_INPUT)

OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
    # Without their return_* flag, these three come on the final response only, the count being the total.
    # With it, on every response as vllm_backend's: finish_reason "None" until the last, num_output_tokens the
    # tokens of that response.
    TensorSpec("finish_reason", "TYPE_STRING", (-1,)),
    TensorSpec("num_input_tokens", "TYPE_INT32", (1,)),
    TensorSpec("num_output_tokens", "TYPE_INT32", (1,)),
    TensorSpec("num_cached_tokens", "TYPE_INT32", (1,)),  # final: prompt tokens whose keys were reused, not computed
    # If asked for (return_logprobs, or `logprobs` in sampling_parameters): this response's tokens' logprobs as
    # JSON in vLLM's shape, [{"<token id>": {"logprob", "rank", "decoded_token"}, ...} per token], chosen first.
    TensorSpec("logprobs", "TYPE_STRING", (-1,)),
    TensorSpec("cumulative_logprob", "TYPE_FP32", (-1,)),  # if asked for: the sum over every token so far
    # If `prompt_logprobs` is in sampling_parameters, with the first token: JSON in vLLM's shape, one entry per
    # prompt token, null for the first (nothing precedes it), then {"<token id>": {...}} with the prompt's first.
    TensorSpec("prompt_logprobs", "TYPE_STRING", (-1,)),
)
