"""Agents: declarations, the provider SPI, and the pool of closable, journaled handles.

Depends only on :mod:`agentflow.types` and :mod:`agentflow.errors`; the core imports
no LLM SDK (providers are separate distributions found through entry points).
"""

from .config import Agent, AgentReply, AgentsConfig, RateLimit, TokenBudget
from .mcp import MCPServer
from .pool import AgentAccessor, AgentHandle, AgentPools, PoolStatistics, load_provider
from .spi import (
    AgentJournal,
    Limiter,
    Message,
    Permit,
    Provider,
    ProviderReply,
    ProviderRequest,
    ToolSpec,
    ToolUse,
    redacting,
    reply_body,
)

__all__ = [
    "Agent",
    "AgentAccessor",
    "AgentHandle",
    "AgentJournal",
    "AgentPools",
    "AgentReply",
    "AgentsConfig",
    "Limiter",
    "MCPServer",
    "Message",
    "Permit",
    "PoolStatistics",
    "Provider",
    "ProviderReply",
    "ProviderRequest",
    "RateLimit",
    "TokenBudget",
    "ToolSpec",
    "ToolUse",
    "load_provider",
    "redacting",
    "reply_body",
]
