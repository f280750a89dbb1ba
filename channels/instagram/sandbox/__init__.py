"""A stand-in for Meta's side of Instagram messaging, for tests, demos and local runs.

It serves the OAuth dialogs, token, account, subscription, profile and Send API endpoints of
every Meta host under one address (see ``sandbox_base_urls``), answers with Meta's bodies and
errors, and sends signed webhooks when a test makes a customer act. Nothing reaches Meta.
"""

from .app import RunningSandbox, create_sandbox_app, run_sandbox, start_sandbox
from .client import SandboxClient, SandboxControlError
from .common import HOST_PREFIXES, STATE, sandbox_base_urls
from .errors import GraphError, InstagramOAuthError
from .settings import SandboxSettings, SandboxSettingsError
from .state import SandboxState
from .webhooks import sign as sign_webhook

__all__ = [
    "HOST_PREFIXES",
    "STATE",
    "GraphError",
    "InstagramOAuthError",
    "RunningSandbox",
    "SandboxClient",
    "SandboxControlError",
    "SandboxSettings",
    "SandboxSettingsError",
    "SandboxState",
    "create_sandbox_app",
    "run_sandbox",
    "sandbox_base_urls",
    "sign_webhook",
    "start_sandbox",
]
