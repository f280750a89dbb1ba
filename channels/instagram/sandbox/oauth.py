"""Both login flows: the dialogs, the code exchanges, the long-lived exchanges and the refresh."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web
from yarl import URL

from . import errors, ids
from .common import VERSION, graph_json, injected, params_of, state_of
from .errors import GraphError, InstagramOAuthError
from .state import (
    CODE_TTL_S,
    LONG_TOKEN_TTL_S,
    REFRESH_MIN_AGE_S,
    SHORT_TOKEN_TTL_S,
    AuthCode,
    FacebookUser,
    SandboxState,
)

OLD_INSTAGRAM_SCOPES = frozenset(
    {
        "business_basic",
        "business_manage_messages",
        "business_manage_comments",
        "business_content_publish",
    }
)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _scopes(raw: str) -> tuple[str, ...]:
    return tuple(s for s in raw.replace(" ", ",").split(",") if s)


def _redirect(target: str, query: dict[str, str], fragment: str) -> web.HTTPFound:
    url = URL(target).update_query(query).with_fragment(fragment)
    return web.HTTPFound(str(url))


def _error_page(message: str) -> web.Response:
    # Meta shows a human page, not JSON, when the dialog itself is misused.
    body = f"<!DOCTYPE html><html><body><h1>Error</h1><p>{message}</p></body></html>"
    return web.Response(status=400, text=body, content_type="text/html")


def _registered(state: SandboxState, redirect_uri: str) -> bool:
    return not state.settings.redirect_uris or redirect_uri in state.settings.redirect_uris


# dialogs


async def facebook_dialog(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    q = request.query
    if q.get("client_id") != state.settings.facebook_app_id:
        return _error_page("Invalid App ID: The provided app ID does not look like a valid app ID.")
    redirect_uri = q.get("redirect_uri", "")
    if not redirect_uri or not _registered(state, redirect_uri):
        return _error_page(
            "URL Blocked: This redirect failed because the redirect URI is not whitelisted in"
            " the app's Client OAuth Settings."
        )
    if q.get("response_type", "code") != "code":
        return _error_page("Only response_type=code is supported by the sandbox.")
    passthrough = {"state": q["state"]} if "state" in q else {}
    approval = state.pop_approval()
    if approval.refuse:
        raise _redirect(
            redirect_uri,
            {
                "error": "access_denied",
                "error_code": "200",
                "error_description": "Permissions error",
                "error_reason": "user_denied",
                **passthrough,
            },
            "_=_",
        )
    page_ids: list[str] = []
    for any_id in approval.accounts:
        if any_id in state.pages:
            page_ids.append(any_id)
            continue
        account = state.find_account(any_id)
        if account is not None and account.page_id is not None:
            page_ids.append(account.page_id)
    if not approval.accounts:
        created = state.create_account(flow="facebook")
        page_ids.append(created.page_id or "")
    user = FacebookUser(ids.facebook_user_id(), "Sandbox Admin", page_ids)
    state.facebook_users[user.user_id] = user
    code = state.new_code(
        flow="facebook",
        client_id=state.settings.facebook_app_id,
        redirect_uri=redirect_uri,
        scopes=_scopes(q.get("scope", "")),
        fb_user_id=user.user_id,
    )
    raise _redirect(redirect_uri, {"code": code.value, **passthrough}, "_=_")


async def instagram_dialog(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    q = request.query
    if q.get("client_id") != state.settings.instagram_app_id:
        raise InstagramOAuthError("Invalid platform app")
    redirect_uri = q.get("redirect_uri", "")
    if not redirect_uri or not _registered(state, redirect_uri):
        raise InstagramOAuthError("Invalid redirect_uri")
    if q.get("response_type", "code") != "code":
        raise InstagramOAuthError('Only response type "code" is allowed')
    scopes = _scopes(q.get("scope", ""))
    bad = [s for s in scopes if s in OLD_INSTAGRAM_SCOPES]
    if not scopes or bad:
        raise InstagramOAuthError(f"Invalid Scopes: {','.join(bad) or '(none)'}")
    passthrough = {"state": q["state"]} if "state" in q else {}
    approval = state.pop_approval()
    if approval.refuse:
        raise _redirect(
            redirect_uri,
            {
                "error": "access_denied",
                "error_reason": "user_denied",
                "error_description": "The user denied your request.",
                **passthrough,
            },
            "_",
        )
    account = next((a for a in map(state.find_account, approval.accounts) if a is not None), None)
    if account is None:
        account = state.create_account(flow="instagram", page=False)
    code = state.new_code(
        flow="instagram",
        client_id=state.settings.instagram_app_id,
        redirect_uri=redirect_uri,
        scopes=scopes,
        ig_id=account.ig_id,
    )
    raise _redirect(redirect_uri, {"code": code.value, **passthrough}, "_")


# exchanges


def _take_code(
    state: SandboxState, value: str, redirect_uri: str, flow: str
) -> tuple[AuthCode | None, str | None]:
    """The code, or why it is refused (one of: invalid, used, expired, redirect)."""
    code = state.codes.get(value)
    if code is None or code.flow != flow:
        return None, "invalid"
    if code.used:
        return None, "used"
    if code.issued_at + CODE_TTL_S <= state.clock.now():
        return None, "expired"
    if code.redirect_uri != redirect_uri:
        return None, "redirect"
    code.used = True
    return code, None


_FACEBOOK_CODE_ERRORS = {
    "invalid": GraphError(100, "Invalid verification code format."),
    "used": GraphError(100, "This authorization code has been used.", subcode=36009),
    "expired": GraphError(100, "This authorization code has expired.", subcode=36007),
    "redirect": GraphError(
        100,
        "Error validating verification code. Please make sure your redirect_uri is identical"
        " to the one you used in the OAuth dialog request",
        subcode=36008,
    ),
}

_INSTAGRAM_CODE_ERRORS = {
    "invalid": "Invalid authorization code",
    "used": "This authorization code has been used",
    "expired": "This authorization code has expired",
    "redirect": "Error validating verification code. Please make sure your redirect_uri is"
    " identical to the one you used in the OAuth dialog request",
}


def _check_facebook_app(state: SandboxState, params: dict[str, str]) -> None:
    if not params.get("client_id"):
        raise GraphError(101, "Missing client_id parameter.")
    if params["client_id"] != state.settings.facebook_app_id:
        raise GraphError(101, "Error validating application. Invalid application ID.")
    if not params.get("client_secret"):
        raise GraphError(1, "Missing client_secret parameter.")
    if not _same(params["client_secret"], state.settings.facebook_app_secret):
        raise GraphError(1, "Error validating client secret.")


async def facebook_access_token(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    params = await params_of(request)
    injected(state, "oauth")
    _check_facebook_app(state, params)
    if params.get("grant_type") == "fb_exchange_token":
        short = params.get("fb_exchange_token")
        if not short:
            raise errors.invalid_parameter("Missing fb_exchange_token parameter.")
        token = state.check_token(short, flow="facebook")
        if token.kind not in ("facebook_user_short", "facebook_user_long"):
            raise errors.invalid_parameter("fb_exchange_token must be a user access token")
        long = state.issue_token(
            "facebook_user_long", permissions=token.permissions, fb_user_id=token.fb_user_id
        )
        return graph_json(
            state,
            {"access_token": long.value, "token_type": "bearer", "expires_in": LONG_TOKEN_TTL_S},
        )
    for name in ("redirect_uri", "code"):
        if not params.get(name):
            raise errors.invalid_parameter(f"Missing {name} parameter.")
    code, problem = _take_code(state, params["code"], params["redirect_uri"], "facebook")
    if code is None:
        raise _FACEBOOK_CODE_ERRORS[problem or "invalid"]
    token = state.issue_token(
        "facebook_user_short", permissions=code.scopes, fb_user_id=code.fb_user_id
    )
    return graph_json(
        state,
        {"access_token": token.value, "token_type": "bearer", "expires_in": SHORT_TOKEN_TTL_S},
    )


async def instagram_code_exchange(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    params = await params_of(request)
    injected(state, "oauth")
    for name in ("client_id", "client_secret", "grant_type", "redirect_uri", "code"):
        if not params.get(name):
            raise InstagramOAuthError(f"You must provide a {name}")
    if params["client_id"] != state.settings.instagram_app_id:
        raise InstagramOAuthError("Invalid platform app")
    if not _same(params["client_secret"], state.settings.instagram_app_secret):
        raise InstagramOAuthError("Error validating client secret")
    if params["grant_type"] != "authorization_code":
        raise InstagramOAuthError("Unsupported grant_type")
    code, problem = _take_code(state, params["code"], params["redirect_uri"], "instagram")
    if code is None or code.ig_id is None:
        raise InstagramOAuthError(_INSTAGRAM_CODE_ERRORS[problem or "invalid"])
    account = state.accounts[code.ig_id]
    token = state.issue_token("instagram_short", permissions=code.scopes, ig_id=account.ig_id)
    body: dict[str, Any]
    if state.instagram_exchange_shape == "flat":
        body = {
            "access_token": token.value,
            "user_id": int(account.app_scoped_id),
            "permissions": list(code.scopes),
        }
    else:
        body = {
            "data": [
                {
                    "access_token": token.value,
                    "user_id": account.app_scoped_id,
                    "permissions": ",".join(code.scopes),
                }
            ]
        }
    return web.json_response(body)


async def instagram_long_lived(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    params = await params_of(request)
    injected(state, "oauth")
    if params.get("grant_type") != "ig_exchange_token":
        raise errors.invalid_parameter("grant_type must be ig_exchange_token")
    if not params.get("client_secret"):
        raise GraphError(1, "Missing client_secret parameter.")
    if not _same(params["client_secret"], state.settings.instagram_app_secret):
        raise GraphError(1, "Error validating client secret.")
    token = state.check_token(params.get("access_token"), flow="instagram")
    if token.kind != "instagram_short":
        raise errors.invalid_parameter("access_token must be a short-lived Instagram User token")
    long = state.issue_token("instagram_long", permissions=token.permissions, ig_id=token.ig_id)
    return graph_json(
        state,
        {"access_token": long.value, "token_type": "bearer", "expires_in": LONG_TOKEN_TTL_S},
        token.ig_id,
    )


async def instagram_refresh(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    params = await params_of(request)
    injected(state, "oauth")
    if params.get("grant_type") != "ig_refresh_token":
        raise errors.invalid_parameter("grant_type must be ig_refresh_token")
    token = state.check_token(params.get("access_token"), flow="instagram")
    if token.kind != "instagram_long":
        raise errors.invalid_parameter("access_token must be a long-lived Instagram User token")
    if state.clock.now() - token.issued_at < REFRESH_MIN_AGE_S:
        raise errors.invalid_parameter(
            "The access token is less than 24 hours old and cannot be refreshed yet"
        )
    fresh = state.issue_token("instagram_long", permissions=token.permissions, ig_id=token.ig_id)
    return graph_json(
        state,
        {"access_token": fresh.value, "token_type": "bearer", "expires_in": LONG_TOKEN_TTL_S},
        token.ig_id,
    )


def add_routes(app: web.Application) -> None:
    fb_www, ig_www, api_ig, graph_fb, graph_ig = (
        "/facebook-www",
        "/instagram-www",
        "/api-instagram",
        "/graph-facebook",
        "/graph-instagram",
    )
    app.router.add_get(f"{fb_www}/{VERSION}/dialog/oauth", facebook_dialog)
    app.router.add_get(f"{fb_www}/dialog/oauth", facebook_dialog)
    for path in (
        f"{ig_www}/oauth/authorize",
        f"{ig_www}/oauth/authorize/",
        f"{api_ig}/oauth/authorize",
        f"{api_ig}/oauth/authorize/",
    ):
        app.router.add_get(path, instagram_dialog)
    app.router.add_post(f"{api_ig}/oauth/access_token", instagram_code_exchange)
    for path in (f"{graph_fb}/{VERSION}/oauth/access_token", f"{graph_fb}/oauth/access_token"):
        app.router.add_get(path, facebook_access_token)
        app.router.add_post(path, facebook_access_token)
    for prefix in (graph_ig, f"{graph_ig}/{VERSION}"):
        app.router.add_get(f"{prefix}/access_token", instagram_long_lived)
        app.router.add_get(f"{prefix}/refresh_access_token", instagram_refresh)
