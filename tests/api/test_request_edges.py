"""Edges of the read side, of authentication and of the command line: page tokens no
server issued, static tokens with an empty list, padded tenant ids, GetMessage's sender,
bad sandbox arguments. Each test names the contract it checks (the protos' comments, the
README, DESIGN.md).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import orjson
import pytest
from switchboard.v1 import connect_pb2, connect_pb2_grpc, messaging_pb2, messaging_pb2_grpc

from gateway.security.tokens import TokenAuthority, create_token, validate_static_tokens_spec
from tests.gateway_harness import RunningGateway, gateway_environ, run_gateway
from tests.helpers import bearer, error_info, switchboard
from tests.store import factories

# ---- a whole gateway on either backend ----


@pytest.fixture
async def gateway(database: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with run_gateway(gateway_environ(database, str(tmp_path))) as running:
        yield running


@pytest.fixture
async def grpc_channel(gateway: RunningGateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(gateway.grpc_target) as ch:
        yield ch


def _token(kind: str, sort_key: str, item_id: str) -> str:
    """A page token as gateway.store.pagination spells one (urlsafe base64 of JSON)."""
    raw = orjson.dumps([kind, sort_key, item_id])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# Tokens a client can send (tokens are opaque to it: one kept from an old build, one
# corrupted in transit, one hand-made). Each is well-formed base64 JSON of our shape.
BAD_TOKENS = {
    # A time at the edge of the calendar: Python's UTC conversion overflows (SQLite).
    "time-out-of-range": ("0001-01-01T00:00:00+01:00", "cnv_x"),
    # U+0000 inside the id: PostgreSQL refuses it in a text parameter.
    "nul-in-id": ("2024-01-01T00:00:00+00:00", "cnv_\u0000x"),
}


@pytest.mark.parametrize("which", sorted(BAD_TOKENS))
async def test_a_bad_page_token_is_invalid_argument_not_internal(
    gateway: RunningGateway, grpc_channel: grpc.aio.Channel, which: str
) -> None:
    """messaging.proto, ListConversations / ListMessages: "Codes: INVALID_ARGUMENT
    (tenant_id, page_size, page_token)"; connect.proto, ListConnections likewise. A page
    token that is not one the server would have issued must name page_token, on either
    backend, never fail the call as INTERNAL."""
    sort_key, item_id = BAD_TOKENS[which]
    store = gateway.gateway.store
    conn = factories.connection("acme")
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        conv = await factories.stored_conversation(tx, conn)
        await tx.insert_message(factories.message(conv))
    auth = bearer(gateway.token)
    messaging = messaging_pb2_grpc.MessagingStub(grpc_channel)
    connect = connect_pb2_grpc.ChannelConnectStub(grpc_channel)
    calls = {
        "ListConversations": lambda: messaging.ListConversations(
            messaging_pb2.ListConversationsRequest(
                tenant_id="acme", page_token=_token("conversations", sort_key, item_id)
            ),
            metadata=auth,
        ),
        "ListMessages": lambda: messaging.ListMessages(
            messaging_pb2.ListMessagesRequest(
                conversation_id=conv.id, page_token=_token("messages", sort_key, item_id)
            ),
            metadata=auth,
        ),
        "ListConnections": lambda: connect.ListConnections(
            connect_pb2.ListConnectionsRequest(
                tenant_id="acme", page_token=_token("connections", sort_key, item_id)
            ),
            metadata=auth,
        ),
    }
    outcomes = {}
    for name, call in calls.items():
        try:
            await call()
            outcomes[name] = "OK"
        except grpc.aio.AioRpcError as exc:
            field = (
                error_info(exc).metadata.get("field", "")
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                else ""
            )
            outcomes[name] = f"{exc.code().name} {field}".strip()
    wanted = {name: "INVALID_ARGUMENT page_token" for name in calls}
    # Accepting the token as a position is tolerable too; failing the call is not.
    assert all(v in ("OK", "INVALID_ARGUMENT page_token") for v in outcomes.values()), (
        outcomes,
        wanted,
    )


# ---- static tokens: an empty tenant or scope list ----


@pytest.mark.parametrize(
    "spec",
    [
        # "$TOKEN@$TENANT/read" with TENANT unset: every tenant.
        "a-static-token-of-enough-length@/read",
        # "$TOKEN@$TENANT/$SCOPES" with SCOPES unset: every scope, admin included.
        "a-static-token-of-enough-length@acme/",
    ],
    ids=["empty-tenants", "empty-scopes"],
)
async def test_a_static_token_with_an_empty_tenant_or_scope_list_is_refused(spec: str) -> None:
    """README: SWITCHBOARD_API_TOKENS is `TOKEN[@TENANT+TENANT][/SCOPE+SCOPE]`: an `@` or a
    `/` with nothing after it is outside that grammar, and is what an unset shell variable
    leaves. Refused (as the CLI refuses `--tenant ""`), never read as every tenant or every
    scope."""
    (problem,) = validate_static_tokens_spec(spec)
    assert "names no" in problem
    with pytest.raises(ValueError, match="names no"):
        TokenAuthority(None, spec)  # type: ignore[arg-type] # static tokens only


def test_a_base64_token_cut_by_its_own_slash_is_refused_without_quoting_it() -> None:
    """A '/' inside the token starts the scope list: the piece after it is the secret's, so
    the problem names the rule, not the word."""
    spec = "q3Xv9LmN2pR7sT1uW4yZ6bC8dE0fG/H5jKqQ9nX2"
    (problem,) = validate_static_tokens_spec(spec)
    assert problem.startswith("SWITCHBOARD_API_TOKENS: token #1: a scope after '/'")
    assert "h5jk" not in problem.lower()
    assert "H5jKqQ9nX2" not in problem


# ---- a tenant id with spaces ----


async def test_a_padded_tenant_id_is_answered_alike_whatever_the_token(
    gateway: RunningGateway, grpc_channel: grpc.aio.Channel
) -> None:
    """tenant_id is read trimmed, by the services and by the tenant check alike: "acme "
    is acme for a token of every tenant and for a token of acme (the answer must not depend
    on which tenants the token names)."""
    store = gateway.gateway.store
    conn = factories.connection("acme")
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        await factories.stored_conversation(tx, conn)
    acme_token, _ = await create_token(store, name="acme", tenants=["acme"], scopes=["read"])
    messaging = messaging_pb2_grpc.MessagingStub(grpc_channel)
    request = messaging_pb2.ListConversationsRequest(tenant_id="acme ")

    def outcome_of(exc: grpc.aio.AioRpcError | None, count: int) -> str:
        return exc.code().name if exc is not None else f"OK {count}"

    answers = {}
    for name, token in (("any-tenant", gateway.token), ("acme", acme_token)):
        try:
            reply = await messaging.ListConversations(request, metadata=bearer(token))
            answers[name] = outcome_of(None, len(reply.conversations))
        except grpc.aio.AioRpcError as exc:
            answers[name] = outcome_of(exc, 0)
    assert answers["any-tenant"] == answers["acme"], answers


# ---- GetMessage and ListMessages describe one message's sender alike ----


async def test_get_message_names_the_sender_as_list_messages_does(
    gateway: RunningGateway, grpc_channel: grpc.aio.Channel
) -> None:
    """DESIGN.md: Message has "sender (participant: channel user id, username, name,
    picture_url)": GetMessage fills the customer's profile in, as ListMessages does."""
    store = gateway.gateway.store
    conn = factories.connection("acme")
    async with store.transaction() as tx:
        await tx.save_connection(conn)
        conv = await factories.stored_conversation(tx, conn)
        message, _ = await tx.insert_message(
            factories.message(conv, sender_id=conv.participant.channel_user_id)
        )
    auth = bearer(gateway.token)
    messaging = messaging_pb2_grpc.MessagingStub(grpc_channel)
    listed = await messaging.ListMessages(
        messaging_pb2.ListMessagesRequest(conversation_id=conv.id), metadata=auth
    )
    [from_list] = listed.messages
    one = await messaging.GetMessage(
        messaging_pb2.GetMessageRequest(message_id=message.id), metadata=auth
    )
    assert from_list.sender.username == "cust"
    assert one.sender == from_list.sender


# ---- the command line ----


def test_sandbox_with_a_port_out_of_range_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`switchboard sandbox [--addr HOST:PORT]`: a port out of range is a usage problem,
    one line and exit 2, as a non-numeric one is."""
    result = switchboard("sandbox", "--addr", "127.0.0.1:70000", env={"HOME": str(tmp_path)})
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    assert result.returncode == 2, (result.returncode, result.stderr[-400:])


def test_sandbox_with_a_bad_log_level_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """README, Configuration: variables are "validated at start: each problem is reported on
    its own line and the process exits with status 2", SWITCHBOARD_LOG_LEVEL for
    `switchboard sandbox` too."""
    result = switchboard(
        "sandbox",
        "--addr",
        "127.0.0.1:0",
        env={"HOME": str(tmp_path), "SWITCHBOARD_LOG_LEVEL": "loud"},
    )
    assert "Traceback" not in result.stderr, result.stderr[-400:]
    assert result.returncode == 2, (result.returncode, result.stderr[-400:])


@pytest.mark.parametrize(
    "spec",
    [
        # "$TOKEN@$TENANT/read" with TENANT read from a CRLF file holding an empty line.
        "a-static-token-of-enough-length@\r/read",
        "a-static-token-of-enough-length@\t/read",
        "a-static-token-of-enough-length@acme/\t+",
    ],
    ids=["cr-tenant", "tab-tenant", "tab-scope"],
)
async def test_a_static_token_whose_tenant_or_scope_list_is_only_whitespace_is_refused(
    spec: str,
) -> None:
    """A tenant or scope list of whitespace alone (a tab, a CR from a file) names nothing:
    refused, never read as every tenant or every scope."""
    problems = validate_static_tokens_spec(spec)
    if not problems:
        authority = TokenAuthority(None, spec)  # type: ignore[arg-type] # static tokens only
        token = await authority.authenticate("a-static-token-of-enough-length")
        pytest.fail(
            f"accepted: tenants={token.tenants} scopes={sorted(s.value for s in token.scopes)}"
        )
