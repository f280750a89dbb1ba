"""``SandboxClient``: the control API from Python, for tests, demos and users' own tests."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import aiohttp

from .common import sandbox_base_urls


class SandboxControlError(Exception):
    """The control API refused a call; ``status`` and ``body`` are its answer."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        super().__init__(f"sandbox control call failed with {status}: {body}")


class SandboxClient:
    """Drives one sandbox at ``url`` over HTTP. Use ``async with`` or call ``aclose``."""

    def __init__(self, url: str, *, session: aiohttp.ClientSession | None = None) -> None:
        self.url = url.rstrip("/")
        self._session = session or aiohttp.ClientSession()
        self._owns_session = session is None

    async def __aenter__(self) -> SandboxClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_session:
            await self._session.close()

    def base_urls(self) -> dict[str, str]:
        return sandbox_base_urls(self.url)

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        async with self._session.request(
            method, f"{self.url}/_sandbox{path}", json=body, params=params
        ) as response:
            data = await response.json(content_type=None)
            if response.status >= 400:
                raise SandboxControlError(response.status, data)
            return data

    @staticmethod
    def _clean(**fields: Any) -> dict[str, Any]:
        return {k: v for k, v in fields.items() if v is not None}

    # configuration

    async def config(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/config")
        return result

    async def update_settings(
        self,
        *,
        latency_ms: float | None = None,
        instagram_exchange_shape: str | None = None,
        echo_timing: str | None = None,
    ) -> dict[str, Any]:
        body = self._clean(
            latency_ms=latency_ms,
            instagram_exchange_shape=instagram_exchange_shape,
            echo_timing=echo_timing,
        )
        result: dict[str, Any] = await self._call("POST", "/settings", body)
        return result

    async def set_webhook(self, url: str | None, *, verify: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/webhook", {"url": url, "verify": verify}
        )
        return result

    # accounts, customers, tokens

    async def create_account(
        self,
        *,
        username: str | None = None,
        name: str | None = None,
        page: bool = True,
        page_name: str | None = None,
        flow: str = "instagram",
    ) -> dict[str, Any]:
        body = self._clean(username=username, name=name, page=page, page_name=page_name, flow=flow)
        result: dict[str, Any] = await self._call("POST", "/accounts", body)
        return result

    async def accounts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", "/accounts"))["data"]
        return result

    async def create_page(self, name: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/pages", self._clean(name=name))
        return result

    async def create_customer(
        self, account: str, *, messaged: bool = False, **profile: Any
    ) -> dict[str, Any]:
        body = {"account": account, "messaged": messaged, **profile}
        result: dict[str, Any] = await self._call("POST", "/customers", body)
        return result

    async def issue_token(self, account: str, kind: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/tokens", self._clean(account=account, kind=kind)
        )
        return result

    async def revoke(
        self, *, token: str | None = None, account: str | None = None, subcode: int = 460
    ) -> int:
        body = self._clean(token=token, account=account, subcode=subcode)
        return int((await self._call("POST", "/tokens/revoke", body))["revoked"])

    # clock and approvals

    async def clock(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/clock")
        return result

    async def advance_clock(self, seconds: float) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", "/clock", {"advance": seconds})
        return result

    async def next_approval(
        self, *, accounts: list[str] | None = None, refuse: bool = False
    ) -> list[dict[str, Any]]:
        body = {"accounts": accounts or [], "refuse": refuse}
        result: list[dict[str, Any]] = (await self._call("POST", "/approvals", body))["data"]
        return result

    # injected errors

    async def inject_error(
        self,
        code: int,
        *,
        subcode: int | None = None,
        endpoint: str = "send",
        account: str | None = None,
        count: int = 1,
        always: bool = False,
        message: str | None = None,
        http_status: int | None = None,
        estimated_time_to_regain_access: int | None = None,
    ) -> dict[str, Any]:
        body = self._clean(
            code=code,
            subcode=subcode,
            endpoint=endpoint,
            account=account,
            count=count,
            always=always,
            message=message,
            http_status=http_status,
            estimated_time_to_regain_access=estimated_time_to_regain_access,
        )
        result: dict[str, Any] = await self._call("POST", "/errors", body)
        return result

    async def clear_errors(self) -> None:
        await self._call("DELETE", "/errors")

    # usage headers on successful sends

    async def set_usage(
        self,
        account: str,
        *,
        business_use_case: dict[str, int] | None = None,
        app: dict[str, int] | None = None,
        count: int | None = None,
    ) -> dict[str, Any]:
        """Usage-header fields (``call_count``, ``total_time``, ``total_cputime``, and for the
        business use case ``estimated_time_to_regain_access`` in minutes) that the account's
        next ``count`` successful Send API calls report (None: until ``clear_usage``)."""
        body = self._clean(
            account=account, business_use_case=business_use_case, app=app, count=count
        )
        result: dict[str, Any] = await self._call("POST", "/usage", body)
        return result

    async def usage(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", "/usage"))["data"]
        return result

    async def clear_usage(self, account: str | None = None) -> None:
        await self._call("DELETE", "/usage", params={"account": account} if account else None)

    # what the gateway did

    async def subscriptions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", "/subscriptions"))["data"]
        return result

    async def sent(self, account: str | None = None) -> list[dict[str, Any]]:
        params = {"account": account} if account else None
        result: list[dict[str, Any]] = (await self._call("GET", "/sent", params=params))["data"]
        return result

    async def clear_sent(self) -> None:
        await self._call("DELETE", "/sent")

    async def deliveries(self, kind: str | None = None) -> list[dict[str, Any]]:
        params = {"kind": kind} if kind else None
        result: list[dict[str, Any]] = (await self._call("GET", "/deliveries", params=params))[
            "data"
        ]
        return result

    async def retry_delivery(self, delivery_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/deliveries/{delivery_id}/retry")
        return result

    async def drain_echoes(self) -> None:
        await self._call("POST", "/deliveries/drain")

    # customer actions

    async def event(self, kind: str, account: str, **fields: Any) -> dict[str, Any]:
        """Make a customer act (``message``, ``reaction``, ``read``, ``edit``, ``unsend``,
        ``postback``, ``referral``): the webhook's status, payload, raw body and signature."""
        result: dict[str, Any] = await self._call(
            "POST", f"/events/{kind}", {"account": account, **fields}
        )
        return result

    async def send_dm(
        self, account: str, text: str | None = "Hi", *, customer: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        return await self.event(
            "message", account, **self._clean(text=text, customer=customer), **fields
        )

    async def batch(
        self, items: list[dict[str, Any]], *, entry_per_item: bool = False, deliver: bool = True
    ) -> dict[str, Any]:
        body = {"items": items, "entry_per_item": entry_per_item, "deliver": deliver}
        result: dict[str, Any] = await self._call("POST", "/events/batch", body)
        return result
