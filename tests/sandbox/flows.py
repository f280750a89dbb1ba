"""The OAuth steps a gateway performs, spelled out once for the tests."""

from __future__ import annotations

from typing import Any

import aiohttp
from yarl import URL

from channels.instagram.sandbox import RunningSandbox

REDIRECT_URI = "https://gateway.example/oauth/instagram/callback"
IG_SCOPES = "instagram_business_basic,instagram_business_manage_messages"
FB_SCOPES = "instagram_basic,instagram_manage_messages,pages_manage_metadata,pages_show_list"


async def instagram_login(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, *, state: str = "s1"
) -> tuple[str, URL]:
    """Run the Instagram dialog; return the code and the redirect it came in."""
    urls = sandbox.base_urls()
    response = await http.get(
        urls["INSTAGRAM_WWW_URL"] + "/oauth/authorize",
        params={
            "client_id": sandbox.settings.instagram_app_id,
            "redirect_uri": REDIRECT_URI,
            "response_type": "code",
            "scope": IG_SCOPES,
            "state": state,
        },
        allow_redirects=False,
    )
    assert response.status == 302
    location = URL(response.headers["Location"])
    return location.query.get("code", ""), location


async def instagram_exchange(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, code: str, **overrides: str
) -> aiohttp.ClientResponse:
    form = {
        "client_id": sandbox.settings.instagram_app_id,
        "client_secret": sandbox.settings.instagram_app_secret,
        "grant_type": "authorization_code",
        "redirect_uri": REDIRECT_URI,
        "code": code,
        **overrides,
    }
    return await http.post(
        sandbox.base_urls()["INSTAGRAM_API_URL"] + "/oauth/access_token", data=form
    )


async def facebook_login(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, *, state: str = "s1"
) -> tuple[str, URL]:
    urls = sandbox.base_urls()
    response = await http.get(
        urls["INSTAGRAM_FACEBOOK_WWW_URL"] + "/v21.0/dialog/oauth",
        params={
            "client_id": sandbox.settings.facebook_app_id,
            "redirect_uri": REDIRECT_URI,
            "response_type": "code",
            "scope": FB_SCOPES,
            "state": state,
        },
        allow_redirects=False,
    )
    assert response.status == 302
    location = URL(response.headers["Location"])
    return location.query.get("code", ""), location


async def facebook_exchange(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, code: str, **overrides: str
) -> aiohttp.ClientResponse:
    params = {
        "client_id": sandbox.settings.facebook_app_id,
        "client_secret": sandbox.settings.facebook_app_secret,
        "redirect_uri": REDIRECT_URI,
        "code": code,
        **overrides,
    }
    return await http.get(
        sandbox.base_urls()["INSTAGRAM_GRAPH_FACEBOOK_URL"] + "/v21.0/oauth/access_token",
        params=params,
    )


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json()
    error: dict[str, Any] = body["error"]
    # graph.instagram.com calls some errors IGApiException; everything else is OAuthException.
    assert error["type"] in ("OAuthException", "IGApiException")
    assert error["fbtrace_id"]
    return error
