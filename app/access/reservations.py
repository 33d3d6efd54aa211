"""What a request reserves of its key's limits when it is admitted, worst case first, and
what its budget lets it generate. Pure arithmetic: the in-memory limiter calls it and the
Redis script (``app.access.redis_limits``) mirrors it line for line.

- **tpm** (a rate): the prompt (estimated from the bytes read) plus ``max_tokens × n``;
  without ``max_tokens``, a documented estimate per choice (``--tpm-estimate``, at most
  what the limit leaves after the prompt, so that a small limit still lets a request
  through). It is settled to what the request used when it ends: a minute may overrun by
  what requests without max_tokens made past their estimate.
- **budget** (money): the prompt plus ``max_tokens × n``, refused if that is more than
  what is left. Without ``max_tokens``, the reply is capped at what is left after the
  prompt (shared between the ``n`` choices) and that cap is sent to the model, so the
  reservation always holds; when the model's known context leaves less than the budget
  would, the context is the bound and nothing needs sending. When the context is not
  known, the cap is at most UNKNOWN_CONTEXT and always sent.
"""
from __future__ import annotations

from dataclasses import dataclass

# Tokens a choice may generate when the model's context is not known (an upstream without
# context_length, a worker not asked yet): what a reservation without max_tokens holds.
UNKNOWN_CONTEXT = 4096
BYTES_PER_TOKEN = 4  # OpenAI's rule of thumb for English text


def estimate_tokens(byte_count: int) -> int:
    """A prompt's tokens, estimated from its bytes (rounded up)."""
    return -(-byte_count // BYTES_PER_TOKEN)


@dataclass(slots=True)  # one per request: slots, not frozen, for a cheap __init__
class Ask:
    """What one request asks of its key's limits."""

    prompt: int  # estimated prompt tokens
    completion: int | None  # max_tokens per choice, as the client set it (None: not set)
    choices: int = 1  # generations at once: n, times the prompts
    context: int | None = None  # the model's context length, if known
    counts_request: bool = True  # False: a demo stream, whose ticket counted the request
    reserves: bool = True  # False: a demo ticket (checked and counted, nothing held)


@dataclass(slots=True)
class Plan:
    tokens: int  # counted toward tpm at admission
    budget: int  # held of the budget until the request ends
    cap: int | None  # max tokens per choice to send the model: the budget binds
    short: bool  # the budget cannot cover it now


def completion_room(ask: Ask) -> int:
    """At most how many tokens one choice can generate: what the context leaves after the
    prompt (at least one), or UNKNOWN_CONTEXT."""
    if ask.context is None:
        return UNKNOWN_CONTEXT
    return max(ask.context - ask.prompt, 1)


def budget_need(ask: Ask) -> int:
    """The least a request needs of its budget: with max_tokens all of it, without it one
    token per choice after its prompt."""
    per_choice = ask.completion if ask.completion is not None else 1
    return ask.prompt + per_choice * ask.choices


def plan(ask: Ask, budget_room: int | None, tpm_estimate: int,
         tpm_limit: int | None = None) -> Plan:
    """``budget_room``: what is left of the budget (None: no budget)."""
    room = completion_room(ask)
    cap = None
    budget = 0
    short = False
    if budget_room is not None:
        if ask.completion is not None:
            budget = ask.prompt + ask.completion * ask.choices
            short = budget > budget_room
        else:
            per_choice = (budget_room - ask.prompt) // ask.choices
            if per_choice < 1:
                budget, short = ask.prompt + ask.choices, True
            elif per_choice < room or ask.context is None:
                cap = min(per_choice, room)
                budget = ask.prompt + cap * ask.choices
            else:
                budget = ask.prompt + room * ask.choices
    if ask.completion is not None:
        per_choice = ask.completion
    else:
        per_choice = min(tpm_estimate, cap if cap is not None else room)
        if tpm_limit:
            per_choice = max(min(per_choice, (tpm_limit - ask.prompt) // ask.choices), 0)
    return Plan(ask.prompt + per_choice * ask.choices, budget, cap, short)
