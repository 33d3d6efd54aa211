"""What a worker may list under "capabilities" in its /model_details answer (a flaskchat
extension of FastChat's protocol; stock workers list none and get FastChat's behaviour)."""

# The worker enforces the context length itself and refuses with error code 40303, so
# the gateway need not count the prompt's tokens first.
LENGTH_CHECK = "length_check"
# The worker renders the prompt from the request's "messages" with its own chat template.
RENDERS_MESSAGES = "messages"
# The worker applies the model's own sampling defaults (its generation_config.json) to a
# request without temperature, top_p or top_k; the gateway then leaves them out instead of
# sending FastChat's defaults.
SAMPLING_DEFAULTS = "sampling_defaults"
# /worker_generate says how far it got: before its JSON answer it sends a space for each
# token made (a newline when it only keeps the connection alive), and it stops generating
# when its request is closed. A gateway whose client left can then charge what was made.
GENERATE_PROGRESS = "generate_progress"
# An embedding model: chat and completions get a 400 at once instead of a failed try.
EMBEDDING_ONLY = "embedding_only"
# OpenAI chat features a worker may support; without the capability, asking for one is a
# 400 naming the field.
TOOLS = "tools"
RESPONSE_FORMAT = "response_format"
LOGPROBS = "logprobs"
# vLLM's guided decoding parameters: guided_json, guided_regex, guided_choice.
GUIDED = "guided"
# The deprecated "functions" (answered with "function_call"): no flaskchat worker has it.
FUNCTIONS = "functions"
