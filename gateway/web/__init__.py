"""The HTTP sidecar: OAuth redirects, channel webhooks, liveness and readiness."""
