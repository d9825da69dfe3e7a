"""The OpenAI-compatible HTTP API over any `GenerationBackend` (a pipeline: `PipelineBackend`).

    backend = PipelineBackend.for_model(client, model_dir)
    app = create_app(backend, ApiSettings(host="127.0.0.1"))      # a Starlette app
    port = await task_group.start(serve_api, backend, settings, 8000)

Modules: app (the factory and endpoints), schemas (request bodies), generation (limits, stop
strings, one generation), streaming (Server-Sent Events), payloads (response bodies), errors
(OpenAI's error shape), auth (bearer key), backend (the protocol and the pipeline's), server.
"""

from .app import ApiSettings, create_app
from .auth import InsecureBindError
from .backend import GenerationBackend, PipelineBackend, PromptError, TokenizerPrompts
from .errors import ApiError
from .server import serve_api, serve_app

__all__ = [
    "ApiError",
    "ApiSettings",
    "GenerationBackend",
    "InsecureBindError",
    "PipelineBackend",
    "PromptError",
    "TokenizerPrompts",
    "create_app",
    "serve_api",
    "serve_app",
]
