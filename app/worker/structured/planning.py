"""What one request's reply must look like, worked out before it waits for a slot: the
grammar it follows (compiled after the prompt's length is checked) and whether its text
is parsed for tool calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.worker.structured.grammars import Grammar, reply_grammar, tool_grammar
from app.worker.structured.matchers import Constraint, Grammars
from app.worker.structured.tool_calls import ToolCallParser, ToolFormat
from app.worker.structured.tool_prompt import template_tools


@dataclass(frozen=True)
class Plan:
    grammar: Grammar | None = None
    tool_format: ToolFormat | None = None  # the reply is parsed for calls in this format
    tools: list[dict[str, Any]] | None = None  # for the prompt
    parallel: bool = True

    def tool_parser(self) -> ToolCallParser | None:
        """Calls to the request's functions only; at the reply's start only when a grammar
        shapes it (its free text may not hold calls nobody checked)."""
        if self.tool_format is None:
            return None
        names = frozenset(tool["function"]["name"] for tool in self.tools or [])
        return ToolCallParser(self.tool_format, names, self.parallel,
                              leading_only=self.grammar is not None)


FREE = Plan()


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocabulary: int, eos: int) -> None:
        self.grammars = Grammars(tokenizer, vocabulary, eos)
        self.tool_format, self.renders_tools = template_tools(
            getattr(tokenizer, "chat_template", None))

    def plan(self, params: Any) -> Plan:
        """Raises InvalidRequest (naming the field) for a format that cannot be asked."""
        reply = reply_grammar(params)
        tools = params.get("tools") or None
        choice = params.get("tool_choice")
        if tools and choice != "none":
            parallel = params.get("parallel_tool_calls") is not False
            grammar = tool_grammar(tools, choice, parallel, self.tool_format, reply,
                                   free_text=self.renders_tools)
            return Plan(grammar, self.tool_format, tools, parallel)
        return FREE if reply is None else Plan(reply)

    def constraint(self, plan: Plan) -> Constraint | None:
        """The plan's grammar compiled (or found compiled): an InvalidRequest naming the
        field if it cannot be enforced."""
        return None if plan.grammar is None else self.grammars.constraint(plan.grammar)
