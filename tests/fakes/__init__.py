"""Fake upstream LLM servers (real HTTP/1.1 on 127.0.0.1) for the gateway's tests.

``OpenAIFake`` speaks ``POST /v1/chat/completions`` (+ ``GET /v1/models``);
``AnthropicFake`` speaks ``POST /v1/messages`` (+ ``/v1/messages/count_tokens``,
``GET /v1/models``).  Each runs its own event loop in a daemon thread; use ``start()`` /
``stop()`` or ``with``.  ``base_url`` is what to pass as ``base_url=`` to the official SDK.

Which scenario an attempt gets: the ``enqueue``d FIFO (generation requests only), then
``for_model[request model]``, then ``default``.  See ``Scenario`` for the knobs and faults.
"""

from .anthropic_fake import AnthropicFake
from .openai_fake import OpenAIFake
from .scenario import Attempt, Fault, Scenario, ToolCallSpec
from .server import FakeServer

__all__ = [
    "AnthropicFake",
    "Attempt",
    "FakeServer",
    "Fault",
    "OpenAIFake",
    "Scenario",
    "ToolCallSpec",
]
