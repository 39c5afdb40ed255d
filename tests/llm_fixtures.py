"""The ``llm_server`` pytest fixture: a fresh :class:`LLMServer` per test, stopped afterwards.

Import it in ``tests/conftest.py``: ``from llm_fixtures import llm_server  # noqa: F401``.
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
