"""marshmallow schemas for every request body, and the TypedDicts their load() returns."""
from __future__ import annotations

from dataclasses import dataclass, field

from schemas.chat import ApiChatSchema, ChatRequest, ChatSchema
from schemas.completions import CompletionRequest, CompletionSchema
from schemas.embeddings import EmbeddingRequest, EmbeddingSchema
from schemas.messages import ChatMessage
from schemas.responses import ResponsesRequest, ResponsesSchema
from schemas.sampling import SamplingRequest
from schemas.token_check import TokenCheckRequest, TokenCheckSchema

__all__ = ["ApiChatSchema", "ChatMessage", "ChatRequest", "ChatSchema", "CompletionRequest",
           "CompletionSchema", "EmbeddingRequest", "EmbeddingSchema", "RequestSchemas",
           "ResponsesRequest", "ResponsesSchema", "SamplingRequest", "TokenCheckRequest",
           "TokenCheckSchema"]


@dataclass
class RequestSchemas:
    """One instance of each request schema, built with the server's limits."""

    max_n: int = 128
    max_inputs: int = 2048
    max_messages: int = 2048
    max_tokens_limit: int = 1_048_576
    chat: ChatSchema = field(init=False)
    api_chat: ApiChatSchema = field(init=False)
    completion: CompletionSchema = field(init=False)
    embedding: EmbeddingSchema = field(init=False)
    token_check: TokenCheckSchema = field(init=False)
    responses: ResponsesSchema = field(init=False)

    def __post_init__(self) -> None:
        sampling = {"max_n": self.max_n, "max_tokens_limit": self.max_tokens_limit}
        self.chat = ChatSchema(max_messages=self.max_messages, **sampling)
        self.api_chat = ApiChatSchema(max_messages=self.max_messages, **sampling)
        self.completion = CompletionSchema(max_inputs=self.max_inputs, **sampling)
        self.embedding = EmbeddingSchema(max_inputs=self.max_inputs)
        self.token_check = TokenCheckSchema(max_inputs=self.max_inputs)
        self.responses = ResponsesSchema(max_tokens_limit=self.max_tokens_limit)
