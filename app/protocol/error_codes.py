"""FastChat's ErrorCode values (fastchat/constants.py): what a worker puts in a frame's
``error_code``, and what FastChat-era clients read at the top level of an error body."""

VALIDATION_TYPE_ERROR = 40001
INVALID_AUTH_KEY = 40101
INVALID_MODEL = 40301
PARAM_OUT_OF_RANGE = 40302
CONTEXT_OVERFLOW = 40303
RATE_LIMIT = 42901
ENGINE_OVERLOADED = 42903
INTERNAL_ERROR = 50001
CUDA_OUT_OF_MEMORY = 50002
CONTROLLER_NO_WORKER = 50005
CONTROLLER_WORKER_TIMEOUT = 50006
