"""agentflow-openai: the ``openai`` agent provider (Chat Completions, any compatible server)."""

from .provider import OpenAIProvider

__all__ = ["OpenAIProvider"]
