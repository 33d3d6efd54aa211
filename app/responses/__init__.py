"""The Responses API (POST /v1/responses) translated onto the chat path: requests to chat
requests, chat answers and chunks to response objects and named events, and the stored
responses that ``previous_response_id`` continues."""
