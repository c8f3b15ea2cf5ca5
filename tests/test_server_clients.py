"""Agent and extraction libraries, as their users call them, against ``serve`` on random weights:
instructor (TOOLS and JSON_SCHEMA modes), pydantic-ai (a pydantic output type, one function tool)
and the OpenAI Agents SDK (a structured output) each complete a run, because the grammar holds the
random model to what they ask. Each library's own validation is the check."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from .conftest import Server


class Shape(BaseModel):
    """No other keys (as extraction schemas usually say): random weights would otherwise write
    extra keys of random text until max_tokens, which no grammar can shorten."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["circle", "square", "triangle"]
    count: int = Field(ge=0, le=9)
    filled: bool


@pytest.fixture(scope="module")
def server(tiny_one):
    s = Server(tiny_one.bundle, "--ctx-size", "2048", "--parallel", "2", api_key=None)
    yield s
    s.close()


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor(server, mode):
    import instructor
    from openai import OpenAI

    client = instructor.from_openai(OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0),
                                    mode=getattr(instructor.Mode, mode))  # fmt: skip
    for seed in range(3):
        ask = [{"role": "user", "content": "Describe the shape."}]
        shape = client.chat.completions.create(model="tiny", response_model=Shape, max_retries=0, temperature=1.0, seed=seed,
                                               max_tokens=200, messages=ask)  # fmt: skip
        assert isinstance(shape, Shape)


def test_pydantic_ai_with_a_function_tool(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.usage import UsageLimits

    model = OpenAIChatModel("tiny", provider=OpenAIProvider(base_url=server.url + "/v1", api_key="none"))
    agent = Agent(model, output_type=Shape, model_settings={"temperature": 1.0, "seed": 3, "max_tokens": 200})
    looked_up: list[str] = []

    @agent.tool_plain
    def shape_catalogue(name: Literal["circle", "square", "triangle"]) -> str:
        """How many sides a shape has."""
        looked_up.append(name)
        return {"circle": "0 sides", "square": "4 sides", "triangle": "3 sides"}[name]

    result = agent.run_sync("Describe the shape.", usage_limits=UsageLimits(request_limit=30))
    assert isinstance(result.output, Shape)
    assert all(n in ("circle", "square", "triangle") for n in looked_up)  # any call the tool got was valid


def test_openai_agents_sdk_structured_output(server):
    from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
    from agents.model_settings import ModelSettings
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no network here
    model = OpenAIChatCompletionsModel(model="tiny", openai_client=AsyncOpenAI(base_url=server.url + "/v1", api_key="none"))
    agent = Agent(name="describer", instructions="Describe the shape.", model=model, output_type=Shape,
                  model_settings=ModelSettings(temperature=1.0, max_tokens=200, extra_args={"seed": 1}))  # fmt: skip
    result = Runner.run_sync(agent, "What is in the picture?", max_turns=3)
    assert isinstance(result.final_output, Shape)
