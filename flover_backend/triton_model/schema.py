"""The flover models' Triton inputs and outputs, declared once: parsing, the adapter and a config test read this."""

from __future__ import annotations

from dataclasses import dataclass

# Which Python type each Triton data type arrives as, once taken out of its NumPy array.
PYTHON_TYPES = {"TYPE_STRING": str, "TYPE_INT32": int, "TYPE_INT64": int, "TYPE_FP32": float, "TYPE_BOOL": bool}


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


# Every input is optional. The prompt is text_input or input_ids; the rest set SamplingParams fields of
# the same name (SAMPLING_INPUTS) or say how to answer (stream, exclude_input_in_output).
PROMPT_INPUTS = (TensorSpec("text_input", "TYPE_STRING", (1,)), TensorSpec("input_ids", "TYPE_INT32", (-1,)))
SAMPLING_INPUTS = (
    TensorSpec("max_tokens", "TYPE_INT32", (1,)),
    TensorSpec("temperature", "TYPE_FP32", (1,)),
    TensorSpec("top_k", "TYPE_INT32", (1,)),
    TensorSpec("top_p", "TYPE_FP32", (1,)),
    TensorSpec("seed", "TYPE_INT64", (1,)),
    TensorSpec("stop", "TYPE_STRING", (-1,)),
    TensorSpec("stop_token_ids", "TYPE_INT32", (-1,)),
    TensorSpec("ignore_eos", "TYPE_BOOL", (1,)),
    TensorSpec("min_tokens", "TYPE_INT32", (1,)),
    TensorSpec("repetition_penalty", "TYPE_FP32", (1,)),
    TensorSpec("presence_penalty", "TYPE_FP32", (1,)),
    TensorSpec("frequency_penalty", "TYPE_FP32", (1,)),
)
# As Triton's vLLM backend: the number of alternatives per token is `logprobs` in sampling_parameters only (a
# tensor of that name would shadow the output); these flags ask for the outputs of the same names.
RESPONSE_INPUTS = (TensorSpec("stream", "TYPE_BOOL", (1,)), TensorSpec("exclude_input_in_output", "TYPE_BOOL", (1,)),
                   TensorSpec("return_logprobs", "TYPE_BOOL", (1,)),
                   TensorSpec("return_cumulative_logprob", "TYPE_BOOL", (1,)))
JSON_INPUT = TensorSpec("sampling_parameters", "TYPE_STRING", (1,))  # any SamplingParams fields, as JSON
INPUTS = (*PROMPT_INPUTS, *SAMPLING_INPUTS, *RESPONSE_INPUTS, JSON_INPUT)

OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
    TensorSpec("finish_reason", "TYPE_STRING", (-1,)),  # on the final response only
    TensorSpec("num_input_tokens", "TYPE_INT32", (1,)),
    TensorSpec("num_output_tokens", "TYPE_INT32", (1,)),
    # If asked for (return_logprobs, or `logprobs` in sampling_parameters): this response's tokens' logprobs as
    # JSON in vLLM's shape, [{"<token id>": {"logprob", "rank", "decoded_token"}, ...} per token], chosen first.
    TensorSpec("logprobs", "TYPE_STRING", (-1,)),
    TensorSpec("cumulative_logprob", "TYPE_FP32", (-1,)),  # if asked for: the sum over every token so far
    # If `prompt_logprobs` is in sampling_parameters, with the first token: JSON in vLLM's shape, one entry per
    # prompt token, null for the first (nothing precedes it), then {"<token id>": {...}} with the prompt's first.
    TensorSpec("prompt_logprobs", "TYPE_STRING", (-1,)),
)
