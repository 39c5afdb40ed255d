"""agentflow-anthropic: the ``anthropic`` agent provider (Messages API)."""

from .provider import AnthropicProvider

__all__ = ["AnthropicProvider"]
