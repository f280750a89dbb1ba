"""Graph reads, subscriptions, profiles and token errors on both hosts."""

from __future__ import annotations

import aiohttp
import pytest

from channels.instagram.sandbox import RunningSandbox, SandboxClient

from .flows import error_of


@pytest.mark.parametrize("version", ["v21.0", "v1.0", "v99.9", None])
async def test_any_graph_version_prefix_is_accepted(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str], version: str | None
) -> None:
    account = await control.create_account()
    token = (await control.issue_token(account["ig_id"]))["access_token"]
    path = f"/{version}/me" if version else "/me"
    response = await http.get(
        urls["INSTAGRAM_GRAPH_URL"] + path,
        params={"fields": "user_id"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status == 200
    assert (await response.json())["user_id"] == account["ig_id"]


async def test_instagram_subscribed_apps_post_get_delete(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    account = await control.create_account()
    token = (await control.issue_token(account["ig_id"]))["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    url = urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{account['ig_id']}/subscribed_apps"
    fields = "messages,message_reactions,messaging_seen,messaging_postbacks,messaging_referral"
    response = await http.post(url, params={"subscribed_fields": fields}, headers=auth)
    assert await response.json() == {"success": True}

    [listed] = (await (await http.get(url, headers=auth)).json())["data"]
    assert listed["subscribed_fields"] == fields.split(",")
    [recorded] = await control.subscriptions()
    assert recorded["account"] == account["ig_id"]
    assert recorded["flow"] == "instagram"

    response = await http.delete(url, headers=auth)
    assert await response.json() == {"success": True}
    assert (await (await http.get(url, headers=auth)).json()) == {"data": []}
    assert await control.subscriptions() == []


async def test_facebook_subscribed_apps_need_the_page_token_and_known_fields(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    account = await control.create_account(flow="facebook")
    page_token = (await control.issue_token(account["ig_id"], "page"))["access_token"]
    user_token = (await control.issue_token(account["ig_id"], "facebook_user_long"))["access_token"]
    url = urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + f"/v21.0/{account['page_id']}/subscribed_apps"

    error = await error_of(await http.post(url, params={"access_token": page_token}))
    assert error["code"] == 100
    error = await error_of(
        await http.post(url, params={"access_token": page_token, "subscribed_fields": "nope"})
    )
    assert error["code"] == 100
    # An Instagram field name is not a Page field: Meta refuses the whole call.
    error = await error_of(
        await http.post(
            url, params={"access_token": page_token, "subscribed_fields": "messages,messaging_seen"}
        )
    )
    assert error["code"] == 100
    assert "subscribed_fields[1]" in error["message"]
    error = await error_of(
        await http.post(url, params={"access_token": user_token, "subscribed_fields": "messages"})
    )
    assert error["code"] == 210

    response = await http.post(
        url,
        params={"access_token": page_token, "subscribed_fields": "messages,messaging_postbacks"},
    )
    assert await response.json() == {"success": True}
    [recorded] = await control.subscriptions()
    assert recorded["object_id"] == account["page_id"]
    assert recorded["account"] == account["ig_id"]


async def test_profile_needs_the_customer_to_have_messaged_first(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    account = await control.create_account()
    token = (await control.issue_token(account["ig_id"]))["access_token"]
    customer = await control.create_customer(account["ig_id"], name="Ada L", follower_count=7)
    url = urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{customer['igsid']}"
    fields = (
        "name,username,profile_pic,follower_count,is_user_follow_business,"
        "is_business_follow_user,is_verified_user"
    )
    error = await error_of(await http.get(url, params={"fields": fields, "access_token": token}))
    assert error["code"] == 230

    await control.send_dm(account["ig_id"], "hello", customer=customer["igsid"], deliver=False)
    response = await http.get(url, params={"fields": fields, "access_token": token})
    profile = await response.json()
    assert response.status == 200
    assert profile["id"] == customer["igsid"]
    assert profile["name"] == "Ada L"
    assert profile["follower_count"] == 7
    assert set(profile) == set(fields.split(",")) | {"id"}


async def test_profile_of_another_accounts_customer_is_not_found(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    mine = await control.create_account()
    other = await control.create_account()
    customer = await control.create_customer(other["ig_id"], messaged=True)
    token = (await control.issue_token(mine["ig_id"]))["access_token"]
    response = await http.get(
        urls["INSTAGRAM_GRAPH_URL"] + f"/v21.0/{customer['igsid']}",
        params={"fields": "name", "access_token": token},
    )
    error = await error_of(response)
    assert (error["code"], error["error_subcode"]) == (100, 33)


async def test_profile_through_the_facebook_host_with_a_page_token(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    account = await control.create_account(flow="facebook")
    token = (await control.issue_token(account["ig_id"], "page"))["access_token"]
    customer = await control.create_customer(account["ig_id"], messaged=True, username="ada")
    response = await http.get(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + f"/v21.0/{customer['igsid']}",
        params={"fields": "username", "access_token": token},
    )
    assert await response.json() == {"username": "ada", "id": customer["igsid"]}


async def test_token_errors_missing_unknown_revoked(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    me = urls["INSTAGRAM_GRAPH_URL"] + "/v21.0/me"
    assert (await error_of(await http.get(me)))["code"] == 104
    assert (await error_of(await http.get(me, params={"access_token": "IGAAnope"})))["code"] == 190

    account = await control.create_account()
    token = (await control.issue_token(account["ig_id"]))["access_token"]
    assert await control.revoke(account=account["ig_id"]) == 1
    response = await http.get(me, params={"access_token": token})
    error = await error_of(response)
    assert (error["code"], error["error_subcode"]) == (190, 460)

    token = (await control.issue_token(account["ig_id"]))["access_token"]
    await control.revoke(token=token, subcode=458)
    error = await error_of(await http.get(me, params={"access_token": token}))
    assert (error["code"], error["error_subcode"]) == (190, 458)


async def test_a_token_of_one_host_is_not_accepted_by_the_other(
    http: aiohttp.ClientSession, control: SandboxClient, urls: dict[str, str]
) -> None:
    account = await control.create_account()
    ig_token = (await control.issue_token(account["ig_id"]))["access_token"]
    response = await http.get(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + "/v21.0/me", params={"access_token": ig_token}
    )
    assert (await error_of(response))["code"] == 190


async def test_page_node_shows_its_instagram_account(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, urls: dict[str, str]
) -> None:
    account = sandbox.state.create_account(flow="facebook")
    assert account.page_id is not None
    async with aiohttp.ClientSession() as session:
        client = SandboxClient(sandbox.url, session=session)
        token = (await client.issue_token(account.ig_id, "page"))["access_token"]
    response = await http.get(
        urls["INSTAGRAM_GRAPH_FACEBOOK_URL"] + f"/v21.0/{account.page_id}",
        params={"fields": "instagram_business_account{id,username}", "access_token": token},
    )
    body = await response.json()
    assert body == {
        "instagram_business_account": {"id": account.ig_id, "username": account.username},
        "id": account.page_id,
    }


async def test_unknown_graph_paths_answer_in_metas_error_shape(
    http: aiohttp.ClientSession, urls: dict[str, str]
) -> None:
    response = await http.get(urls["INSTAGRAM_GRAPH_URL"] + "/v21.0/me/nonsense/deeper")
    assert response.status == 400
    assert (await error_of(response))["code"] == 2500
