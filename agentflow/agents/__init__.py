"""Agents: declarations, the provider SPI, and the pool of closable, journaled handles.

Depends only on :mod:`agentflow.types` and :mod:`agentflow.errors`; the core imports
no LLM SDK (providers are separate distributions found through entry points).
"""

from .config import Agent, AgentReply, AgentsConfig, TokenBudget
from .mcp import MCPServer
from .pool import AgentAccessor, AgentHandle, AgentPools, PoolStatistics, load_provider
from .spi import (
    AgentJournal,
    Message,
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
    "MCPServer",
    "Message",
    "PoolStatistics",
    "Provider",
    "ProviderReply",
    "ProviderRequest",
    "TokenBudget",
    "ToolSpec",
    "ToolUse",
    "load_provider",
    "redacting",
    "reply_body",
]
