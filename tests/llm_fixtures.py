"""The ``llm_server`` pytest fixture: a fresh :class:`LLMServer` per test, stopped afterwards.

And ``llm_env``: the same server, with both SDKs pointed at it through their usual
environment variables (``OPENAI_*``, ``ANTHROPIC_*``).

Import them in ``tests/conftest.py``: ``from llm_fixtures import llm_env, llm_server``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llm_server import LLMServer


@pytest.fixture
def llm_server() -> Iterator[LLMServer]:
    """A local LLM API server: ``.openai_base_url``, ``.script()``, ``.fail()``, ``.requests``."""
    with LLMServer() as server:
        yield server


@pytest.fixture
def llm_env(monkeypatch: pytest.MonkeyPatch, llm_server: LLMServer) -> LLMServer:
    """``llm_server``, with ``OPENAI_*`` and ``ANTHROPIC_*`` (key and base URL) set to reach it."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-openai-key")
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.openai_base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-anthropic-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", llm_server.anthropic_base_url)
    return llm_server
