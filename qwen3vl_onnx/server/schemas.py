"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

They are the server's contract: FastAPI validates requests against them and publishes them in
``/openapi.json``, which the tests fuzz. Request models ignore fields they do not know (clients
send ``user``, ``metadata``...), but every field they know is bounded.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    """Unknown fields ignored; known ones strictly typed (no "1" for 1, no 0 for false)."""

    model_config = ConfigDict(extra="ignore", strict=True)


MEDIA_URL = r"^(data:|file://|https?://)"


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageUrl(_Lenient):
    url: str = Field(pattern=MEDIA_URL)
    detail: str | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl


class VideoUrl(_Lenient):
    url: str = Field(pattern=MEDIA_URL)
    fps: Annotated[float, Field(gt=0, le=1000)] | None = None
    max_frames: Annotated[int, Field(ge=1)] | None = None
    max_pixels: Annotated[int, Field(ge=1)] | None = None
    video_start: Annotated[float, Field(ge=0)] | None = None
    video_end: Annotated[float, Field(ge=0)] | None = None


class VideoPart(_Lenient):
    type: Literal["video_url"]
    video_url: VideoUrl


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict  # OpenAI sends a JSON string; an object is taken as well


class ToolCallIn(_Lenient):
    """An earlier answer's call, as a client passes the conversation back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    reasoning_content: str | None = None  # an earlier Thinking answer's reasoning, passed back
    tool_calls: list[ToolCallIn] | None = None  # an earlier answer's calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class StreamOptions(_Lenient):
    include_usage: bool | None = False


class JsonSchemaFormat(_Lenient):
    name: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = None  # this server's own: the answer matches it

    def as_dict(self) -> dict:
        out: dict = {"type": self.type, "regex": self.regex}
        if self.json_schema is not None:
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        return out


class ChatCompletionRequest(_Lenient):
    """As in OpenAI's API, every optional field may be null, which means its default; a request
    without ``model`` means the model served."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: Annotated[int, Field(ge=0, le=2**53)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    tools: list[dict] | None = None  # checked in full where they are compiled (one line naming the fault)
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None
    # declared so that a request relying on them is refused by name, not answered as if they were absent
    functions: list[dict] | None = None  # OpenAI's deprecated form of tools
    function_call: str | dict | None = None
    # extensions llama.cpp and vLLM accept
    ignore_eos: bool | None = False
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = 1.0


class ResponsesRequest(_Lenient):
    """OpenAI's Responses API (``/v1/responses``); items are checked where they are read (responses.py)."""

    model: str | None = None
    input: str | list[dict] = Field(min_length=1)
    instructions: str | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = True
    text: dict | None = None  # {"format": {"type": "text" | "json_schema" | "json_object", ...}}
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**53)] | None = None
    stream: bool | None = False
    previous_response_id: str | None = None
    store: bool | None = True
    metadata: dict | None = None


class CompletionRequest(_Lenient):
    """OpenAI's legacy ``/v1/completions``: a raw prompt, no chat template (what llm, litellm and
    the openai client's ``completions.create`` send)."""

    model: str | None = None
    prompt: str | list[str] | list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for this route
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = False
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: Annotated[int, Field(ge=0, le=2**53)] | None = None
    suffix: str | None = None  # refused by name when set (no fill-in-the-middle here)
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None  # refused by name above 1
    ignore_eos: bool | None = False
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = 1.0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen3vl-onnx"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeText(_Lenient):
    model: str | None = None
    prompt: str  # text tokenized as it is


class TokenizeMessages(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)  # a conversation, rendered with the chat template
    add_generation_prompt: bool = True
    tools: list[dict] | None = None  # rendered as a completion with these tools would render them


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**32 - 1)]]  # ids the tokenizer does not know decode to nothing


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok", "loading"]


class SlotState(BaseModel):
    id: int
    busy: bool
    cached_tokens: int
    kv_cache: str  # the cache's precision: fp32 or int8
    kv_cache_bytes: int  # the slot's share of the preallocated cache


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
