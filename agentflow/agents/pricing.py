"""What a model call cost, in USD, from the genai-prices data (an optional dependency).

The provider distributions depend on ``genai-prices``; the core does not import it
until a price is asked for, and without it every cost is None.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import Any

from ..types import Usage

__all__ = ["priced"]


def priced(usage: Usage, provider: str, model: str, base_url: str | None = None) -> Usage:
    """``usage`` with its ``cost`` set from the price of ``model`` at ``provider``.

    With a ``base_url`` (a compatible server, a proxy), the provider is found by that URL
    and only then priced: a self-hosted model is not priced as the hosted one of the same
    name. Unknown provider or model: ``cost`` stays None.
    """
    if usage.cost is not None or not usage.total_tokens:
        return usage
    cost = _price(provider, model, base_url, usage.input_tokens, usage.output_tokens)
    return usage if cost is None else Usage(usage.input_tokens, usage.output_tokens, cost)


@lru_cache(maxsize=4096)
def _price(
    provider: str, model: str, base_url: str | None, input_tokens: int, output_tokens: int
) -> Decimal | None:
    try:
        import genai_prices
    except ImportError:
        return None
    where: dict[str, Any] = {"provider_api_url": base_url} if base_url else {"provider_id": provider}
    try:
        calc = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens), model, **where
        )
    except (LookupError, ValueError):
        return None
    total = calc.total_price
    return total if isinstance(total, Decimal) else Decimal(str(total))
