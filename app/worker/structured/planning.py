"""What one request's reply must look like, worked out before it waits for a slot: its
constraint (a grammar's state) and whether its text is parsed for tool calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.worker.structured.grammars import reply_grammar, tool_grammar
from app.worker.structured.matchers import Constraint, Grammars
from app.worker.structured.tool_calls import ToolFormat
from app.worker.structured.tool_prompt import template_tools


@dataclass(frozen=True)
class Plan:
    constraint: Constraint | None = None
    tool_format: ToolFormat | None = None  # the reply is parsed for calls in this format
    tools: list[dict[str, Any]] | None = None  # for the prompt


FREE = Plan()


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocabulary: int, eos: int) -> None:
        self.grammars = Grammars(tokenizer, vocabulary, eos)
        self.tool_format, self.renders_tools = template_tools(
            getattr(tokenizer, "chat_template", None))

    def plan(self, params: Any) -> Plan:
        """Raises InvalidRequest (naming the field) for a format that cannot be enforced."""
        reply = reply_grammar(params)
        tools = params.get("tools") or None
        choice = params.get("tool_choice")
        if tools and choice != "none":
            parallel = params.get("parallel_tool_calls") is not False
            grammar = tool_grammar(tools, choice, parallel, self.tool_format, reply,
                                   free_text=self.renders_tools)
            return Plan(self._constraint(grammar), self.tool_format, tools)
        if reply is None:
            return FREE
        return Plan(self._constraint(reply))

    def _constraint(self, grammar: Any) -> Constraint | None:
        if grammar is None:
            return None
        return self.grammars.constraint(self.grammars.compile(grammar))
