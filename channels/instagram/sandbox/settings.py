"""The sandbox's settings: the gateway's own credential variables, or generated ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from . import ids

EXCHANGE_SHAPES = ("data", "flat")
ECHO_TIMINGS = ("after", "before")


class SandboxSettingsError(ValueError):
    """A sandbox setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class SandboxSettings:
    """Everything a sandbox instance needs; secrets stay out of ``repr``.

    ``*_generated`` say which credential pairs were invented here rather than read from the
    environment: only those are shown by ``GET /_sandbox/config``.
    """

    instagram_app_id: str
    instagram_app_secret: str = field(repr=False)
    facebook_app_id: str
    facebook_app_secret: str = field(repr=False)
    webhook_verify_token: str = field(repr=False)
    instagram_generated: bool = False
    facebook_generated: bool = False
    verify_token_generated: bool = False
    webhook_url: str | None = None
    latency_ms: float = 0.0
    app_name: str = "Switchboard Sandbox"
    # Registered redirect URIs; empty accepts any, but the exchange must repeat the dialog's.
    redirect_uris: tuple[str, ...] = ()
    # Meta's docs show the Instagram code exchange both wrapped in "data" and flat.
    instagram_exchange_shape: str = "data"
    webhook_timeout_s: float = 10.0
    # Echo deliveries are retried like Meta retries (shortened so tests and demos see it).
    echo_retry_delays_s: tuple[float, ...] = (1.0, 5.0, 30.0)

    @classmethod
    def generate(cls, **overrides: object) -> SandboxSettings:
        """Fresh random credentials for both apps, as the embedded default uses."""
        settings = cls(
            instagram_app_id=ids.app_id(),
            instagram_app_secret=ids.app_secret(),
            facebook_app_id=ids.app_id(),
            facebook_app_secret=ids.app_secret(),
            webhook_verify_token=ids.verify_token(),
            instagram_generated=True,
            facebook_generated=True,
            verify_token_generated=True,
        )
        return replace(settings, **overrides)  # type: ignore[arg-type]

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SandboxSettings:
        """Read the gateway's variables; a pair left unset entirely is generated.

        A pair set by half is an error rather than a silent mix of real and invented values.
        """
        ig_id, ig_secret, ig_generated = _pair(environ, "INSTAGRAM_APP_ID", "INSTAGRAM_APP_SECRET")
        fb_id, fb_secret, fb_generated = _pair(environ, "FACEBOOK_APP_ID", "FACEBOOK_APP_SECRET")
        verify = environ.get("INSTAGRAM_WEBHOOK_VERIFY_TOKEN", "")
        latency_raw = environ.get("INSTAGRAM_SANDBOX_LATENCY_MS", "").strip()
        try:
            latency = float(latency_raw) if latency_raw else 0.0
        except ValueError:
            raise SandboxSettingsError(
                "INSTAGRAM_SANDBOX_LATENCY_MS must be a number of milliseconds,"
                f" got {latency_raw!r}"
            ) from None
        if latency < 0:
            raise SandboxSettingsError("INSTAGRAM_SANDBOX_LATENCY_MS must not be negative")
        redirects = tuple(
            uri for uri in environ.get("INSTAGRAM_REDIRECT_URI", "").split(",") if uri.strip()
        )
        return cls(
            instagram_app_id=ig_id,
            instagram_app_secret=ig_secret,
            facebook_app_id=fb_id,
            facebook_app_secret=fb_secret,
            webhook_verify_token=verify or ids.verify_token(),
            instagram_generated=ig_generated,
            facebook_generated=fb_generated,
            verify_token_generated=not verify,
            webhook_url=environ.get("INSTAGRAM_SANDBOX_WEBHOOK_URL") or None,
            latency_ms=latency,
            redirect_uris=tuple(uri.strip() for uri in redirects),
        )

    def credentials(self) -> dict[str, str]:
        """The credential variables, as the gateway reads them, for an in-process sandbox."""
        return {
            "INSTAGRAM_APP_ID": self.instagram_app_id,
            "INSTAGRAM_APP_SECRET": self.instagram_app_secret,
            "FACEBOOK_APP_ID": self.facebook_app_id,
            "FACEBOOK_APP_SECRET": self.facebook_app_secret,
            "INSTAGRAM_WEBHOOK_VERIFY_TOKEN": self.webhook_verify_token,
        }


def _pair(environ: Mapping[str, str], id_name: str, secret_name: str) -> tuple[str, str, bool]:
    app = environ.get(id_name, "").strip()
    secret = environ.get(secret_name, "").strip()
    if app and secret:
        return app, secret, False
    if not app and not secret:
        return ids.app_id(), ids.app_secret(), True
    missing = secret_name if app else id_name
    present = id_name if app else secret_name
    raise SandboxSettingsError(f"{missing} is not set while {present} is: set both or neither")
