"""Both login flows over real HTTP: dialogs, exchanges, long-lived tokens, refresh."""

from __future__ import annotations

import aiohttp

from channels.instagram.sandbox import RunningSandbox, SandboxClient

from .flows import (
    REDIRECT_URI,
    error_of,
    facebook_exchange,
    facebook_login,
    instagram_exchange,
    instagram_login,
)


async def test_instagram_login_end_to_end_yields_a_long_lived_token_and_the_webhook_ig_id(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, urls: dict[str, str]
) -> None:
    code, redirect = await instagram_login(http, sandbox, state="xyz")
    assert str(redirect).startswith(REDIRECT_URI + "?")
    assert redirect.query["state"] == "xyz"
    assert redirect.fragment == "_"  # Instagram appends #_ to the redirect

    response = await instagram_exchange(http, sandbox, code)
    assert response.status == 200
    [grant] = (await response.json())["data"]
    assert grant["access_token"].startswith("IGAA")
    assert grant["permissions"].split(",") == [
        "instagram_business_basic",
        "instagram_business_manage_messages",
    ]

    response = await http.get(
        urls["INSTAGRAM_GRAPH_URL"] + "/access_token",
        params={
            "grant_type": "ig_exchange_token",
            "client_secret": sandbox.settings.instagram_app_secret,
            "access_token": grant["access_token"],
        },
    )
    long = await response.json()
    assert response.status == 200
    assert long["token_type"] == "bearer"
    assert long["expires_in"] == 5183944
    assert long["access_token"] != grant["access_token"]

    response = await http.get(
        urls["INSTAGRAM_GRAPH_URL"] + "/v23.0/me",
        params={"fields": "user_id,username,name,account_type,profile_picture_url"},
        headers={"Authorization": f"Bearer {long['access_token']}"},
    )
    me = await response.json()
    assert response.status == 200
    [account] = sandbox.state.accounts.values()
    # /me's id is app-scoped, like the exchange's user_id; user_id is the IG_ID in webhooks.
    assert me["id"] == grant["user_id"] != me["user_id"]
    assert me["user_id"] == account.ig_id
    assert len(me["user_id"]) == 17
    assert me["account_type"] == "BUSINESS"
    assert set(me) == {"id", "user_id", "username", "name", "account_type", "profile_picture_url"}


async def test_instagram_exchange_can_answer_in_the_flat_shape(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, control: SandboxClient
) -> None:
    await control.update_settings(instagram_exchange_shape="flat")
    code, _ = await instagram_login(http, sandbox)
    body = await (await instagram_exchange(http, sandbox, code)).json()
    assert body["access_token"].startswith("IGAA")
    assert isinstance(body["user_id"], int)
    assert body["permissions"] == ["instagram_business_basic", "instagram_business_manage_messages"]


async def test_facebook_login_end_to_end_lists_pages_with_page_tokens_and_linked_accounts(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, urls: dict[str, str]
) -> None:
    code, redirect = await facebook_login(http, sandbox, state="abc")
    assert redirect.query["state"] == "abc"
    assert redirect.fragment == "_=_"

    response = await facebook_exchange(http, sandbox, code)
    short = await response.json()
    assert response.status == 200
    assert short["access_token"].startswith("EAA")
    assert short["token_type"] == "bearer"

    response = await http.get(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + "/v21.0/oauth/access_token",
        params={
            "grant_type": "fb_exchange_token",
            "client_id": sandbox.settings.facebook_app_id,
            "client_secret": sandbox.settings.facebook_app_secret,
            "fb_exchange_token": short["access_token"],
        },
    )
    long = await response.json()
    assert response.status == 200
    assert long["expires_in"] == 5183944

    response = await http.get(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + "/v21.0/me/accounts",
        params={
            "fields": "id,name,access_token,tasks,instagram_business_account{id,username}",
            "access_token": long["access_token"],
        },
    )
    body = await response.json()
    assert response.status == 200
    [page] = body["data"]
    [account] = sandbox.state.accounts.values()
    assert page["id"] == account.page_id
    assert page["access_token"].startswith("EAA")
    assert "MESSAGING" in page["tasks"]
    assert page["instagram_business_account"] == {"id": account.ig_id, "username": account.username}
    # A page token from a long-lived user token does not expire.
    assert sandbox.state.tokens[page["access_token"]].expires_at is None

    response = await http.get(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + "/v21.0/me",
        params={"access_token": long["access_token"]},
    )
    assert set(await response.json()) == {"id", "name"}


async def test_refused_dialogs_redirect_with_access_denied_and_the_state(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, control: SandboxClient
) -> None:
    await control.next_approval(refuse=True)
    _, redirect = await instagram_login(http, sandbox, state="st-1")
    assert redirect.query["error"] == "access_denied"
    assert redirect.query["error_reason"] == "user_denied"
    assert redirect.query["error_description"]
    assert redirect.query["state"] == "st-1"
    assert "code" not in redirect.query

    await control.next_approval(refuse=True)
    _, redirect = await facebook_login(http, sandbox, state="st-2")
    assert redirect.query["error"] == "access_denied"
    assert redirect.query["state"] == "st-2"

    # The directive is used once: the next dialog approves again.
    code, _ = await instagram_login(http, sandbox)
    assert code


async def test_each_approval_signs_in_as_a_new_business_unless_told_otherwise(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, control: SandboxClient
) -> None:
    first, _ = await instagram_login(http, sandbox)
    second, _ = await instagram_login(http, sandbox)
    ig_ids = {sandbox.state.codes[c].ig_id for c in (first, second)}
    assert len(ig_ids) == 2

    chosen = await control.create_account(username="acme_shop")
    await control.next_approval(accounts=[chosen["ig_id"]])
    code, _ = await instagram_login(http, sandbox)
    assert sandbox.state.codes[code].ig_id == chosen["ig_id"]


async def test_facebook_approval_can_grant_several_pages_some_without_instagram(
    http: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    control: SandboxClient,
    urls: dict[str, str],
) -> None:
    bare = await control.create_page("Bakery (no Instagram)")
    linked = await control.create_account(flow="facebook")
    await control.next_approval(accounts=[bare["page_id"], linked["page_id"]])
    code, _ = await facebook_login(http, sandbox)
    token = (await (await facebook_exchange(http, sandbox, code)).json())["access_token"]
    response = await http.get(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + "/v21.0/me/accounts",
        params={"fields": "id,instagram_business_account{id}", "access_token": token},
    )
    pages = {p["id"]: p for p in (await response.json())["data"]}
    assert set(pages) == {bare["page_id"], linked["page_id"]}
    assert "instagram_business_account" not in pages[bare["page_id"]]
    assert pages[linked["page_id"]]["instagram_business_account"] == {"id": linked["ig_id"]}


async def test_codes_work_once(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
    code, _ = await instagram_login(http, sandbox)
    assert (await instagram_exchange(http, sandbox, code)).status == 200
    response = await instagram_exchange(http, sandbox, code)
    assert response.status == 400
    assert await response.json() == {
        "error_type": "OAuthException",
        "code": 400,
        "error_message": "This authorization code has been used",
    }

    code, _ = await facebook_login(http, sandbox)
    assert (await facebook_exchange(http, sandbox, code)).status == 200
    response = await facebook_exchange(http, sandbox, code)
    error = await error_of(response)
    assert (error["code"], error["error_subcode"]) == (100, 36009)


async def test_codes_expire_after_an_hour(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, control: SandboxClient
) -> None:
    ig_code, _ = await instagram_login(http, sandbox)
    fb_code, _ = await facebook_login(http, sandbox)
    await control.advance_clock(3601)
    response = await instagram_exchange(http, sandbox, ig_code)
    assert (await response.json())["error_message"] == "This authorization code has expired"
    error = await error_of(await facebook_exchange(http, sandbox, fb_code))
    assert (error["code"], error["error_subcode"]) == (100, 36007)


async def test_a_code_with_the_fragment_left_on_is_not_a_valid_code(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    code, _ = await instagram_login(http, sandbox)
    response = await instagram_exchange(http, sandbox, code + "#_")
    assert (await response.json())["error_message"] == "Invalid authorization code"
    assert (await instagram_exchange(http, sandbox, code)).status == 200


async def test_wrong_secret_client_or_redirect_uri_is_refused_as_meta_does(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    code, _ = await instagram_login(http, sandbox)
    response = await instagram_exchange(http, sandbox, code, client_secret="0" * 32)
    assert response.status == 400
    assert await response.json() == {
        "error_type": "OAuthException",
        "code": 400,
        "error_message": "Error validating client secret",
    }
    response = await instagram_exchange(http, sandbox, code, client_id="123")
    assert (await response.json())["error_message"] == "Invalid platform app"
    response = await instagram_exchange(http, sandbox, code, redirect_uri=REDIRECT_URI + "/x")
    assert "redirect_uri" in (await response.json())["error_message"]

    code, _ = await facebook_login(http, sandbox)
    error = await error_of(await facebook_exchange(http, sandbox, code, client_secret="nope"))
    assert error["code"] == 1
    assert error["message"] == "Error validating client secret."
    error = await error_of(await facebook_exchange(http, sandbox, code, redirect_uri="https://x/"))
    assert (error["code"], error["error_subcode"]) == (100, 36008)
    # Refusals above did not consume the code.
    assert (await facebook_exchange(http, sandbox, code)).status == 200


async def test_dialog_with_a_wrong_client_id_or_old_scopes_is_an_error_not_a_redirect(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, urls: dict[str, str]
) -> None:
    response = await http.get(
        urls["INSTAGRAM_WWW_URL"] + "/oauth/authorize",
        params={
            "client_id": "1",
            "redirect_uri": REDIRECT_URI,
            "scope": "instagram_business_basic",
        },
        allow_redirects=False,
    )
    assert response.status == 400
    assert (await response.json())["error_message"] == "Invalid platform app"
    response = await http.get(
        urls["INSTAGRAM_WWW_URL"] + "/oauth/authorize",
        params={
            "client_id": sandbox.settings.instagram_app_id,
            "redirect_uri": REDIRECT_URI,
            "scope": "business_basic,business_manage_messages",
        },
        allow_redirects=False,
    )
    assert response.status == 400
    assert "business_basic" in (await response.json())["error_message"]
    response = await http.get(
        urls["INSTAGRAM_FACEBOOK_WWW_URL"] + "/v19.0/dialog/oauth",
        params={"client_id": "1", "redirect_uri": REDIRECT_URI},
        allow_redirects=False,
    )
    assert response.status == 400


async def _long_lived_instagram_token(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> str:
    code, _ = await instagram_login(http, sandbox)
    short = (await (await instagram_exchange(http, sandbox, code)).json())["data"][0]
    response = await http.get(
        sandbox.base_urls()["INSTAGRAM_GRAPH_URL"] + "/access_token",
        params={
            "grant_type": "ig_exchange_token",
            "client_secret": sandbox.settings.instagram_app_secret,
            "access_token": short["access_token"],
        },
    )
    token: str = (await response.json())["access_token"]
    return token


async def test_refresh_is_refused_under_24_hours_and_accepted_after(
    http: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    control: SandboxClient,
    urls: dict[str, str],
) -> None:
    token = await _long_lived_instagram_token(http, sandbox)
    refresh = urls["INSTAGRAM_GRAPH_URL"] + "/refresh_access_token"
    params = {"grant_type": "ig_refresh_token", "access_token": token}

    error = await error_of(await http.get(refresh, params=params))
    assert error["code"] == 100

    await control.advance_clock(24 * 3600 + 1)
    response = await http.get(refresh, params=params)
    body = await response.json()
    assert response.status == 200
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 5183944
    assert body["access_token"].startswith("IGAA")

    # After 60 days the old token is expired and can no longer be refreshed.
    await control.advance_clock(60 * 24 * 3600)
    error = await error_of(await http.get(refresh, params=params))
    assert (error["code"], error["error_subcode"]) == (190, 463)


async def test_short_lived_tokens_expire_after_an_hour(
    http: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    control: SandboxClient,
    urls: dict[str, str],
) -> None:
    code, _ = await instagram_login(http, sandbox)
    token = (await (await instagram_exchange(http, sandbox, code)).json())["data"][0][
        "access_token"
    ]
    me = urls["INSTAGRAM_GRAPH_URL"] + "/v21.0/me"
    assert (await http.get(me, params={"access_token": token})).status == 200
    await control.advance_clock(3600)
    response = await http.get(me, params={"access_token": token})
    error = await error_of(response)
    assert response.status == 400
    assert (error["code"], error["error_subcode"]) == (190, 463)
