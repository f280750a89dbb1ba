"""switchboard.v1.Messaging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from switchboard.v1 import common_pb2, messaging_pb2, messaging_pb2_grpc

from gateway.api import convert, convert_send
from gateway.api.context import Ctx
from gateway.api.interceptors import current_token, require_owner, require_tenant
from gateway.domain.bus import Bus
from gateway.domain.errors import Unimplemented
from gateway.domain.models import Direction
from gateway.services.history import History
from gateway.services.outbound import OutboundService


class MessagingServicer(messaging_pb2_grpc.MessagingServicer):
    def __init__(
        self, history: History, bus: Bus | None, outbound: OutboundService | None = None
    ) -> None:
        self._history = history
        self._bus = bus
        self._outbound = outbound
        # Set when the server stops: open Subscribe streams end at once (see drain).
        self._stopping = asyncio.Event()

    def drain(self) -> None:
        """Ends every Subscribe stream now, consumers closed first: held open through the
        server's grace period, they would keep their conversations from the group's other
        consumers until their leases lapsed, and take new deliveries meanwhile."""
        self._stopping.set()

    async def SendMessage(
        self, request: messaging_pb2.SendMessageRequest, context: Ctx
    ) -> messaging_pb2.SendMessageResponse:
        require_tenant(request.tenant_id)
        if self._outbound is None:
            raise Unimplemented("this process does not send messages")
        outcome = await self._outbound.send(convert_send.send_request(request))
        reply = convert.message(outcome.message)
        if outcome.duplicate:
            reply.attempts.extend(
                convert_send.attempts(await self._outbound.attempts(outcome.message.id))
            )
        return messaging_pb2.SendMessageResponse(message=reply, duplicate=outcome.duplicate)

    async def GetMessage(
        self, request: messaging_pb2.GetMessageRequest, context: Ctx
    ) -> common_pb2.Message:
        message = await self._history.get_message(request.message_id)
        require_owner(message.tenant_id, "message", request.message_id)
        # The sender as ListMessages names it: the conversation's participant, profile and all.
        participant = None
        if message.sender_id:
            conversation = await self._history.get_conversation(message.conversation_id)
            if conversation.participant.channel_user_id == message.sender_id:
                participant = conversation.participant
        reply = convert.message(message, participant)
        if message.direction is Direction.OUTBOUND and self._outbound is not None:
            reply.attempts.extend(convert_send.attempts(await self._outbound.attempts(message.id)))
        return reply

    async def ListConversations(
        self, request: messaging_pb2.ListConversationsRequest, context: Ctx
    ) -> messaging_pb2.ListConversationsResponse:
        require_tenant(request.tenant_id)
        page = await self._history.list_conversations(
            request.tenant_id,
            connection_id=request.connection_id,
            size=request.page_size,
            token=request.page_token,
        )
        return messaging_pb2.ListConversationsResponse(
            conversations=[convert.conversation(c) for c in page.items],
            next_page_token=page.next_token,
        )

    async def GetConversation(
        self, request: messaging_pb2.GetConversationRequest, context: Ctx
    ) -> common_pb2.Conversation:
        conversation = await self._history.get_conversation(request.conversation_id)
        require_owner(conversation.tenant_id, "conversation", request.conversation_id)
        return convert.conversation(conversation)

    async def ListMessages(
        self, request: messaging_pb2.ListMessagesRequest, context: Ctx
    ) -> messaging_pb2.ListMessagesResponse:
        conversation = await self._history.get_conversation(request.conversation_id)
        require_owner(conversation.tenant_id, "conversation", request.conversation_id)
        _, page = await self._history.list_messages(
            conversation.id, size=request.page_size, token=request.page_token
        )
        participant = conversation.participant
        return messaging_pb2.ListMessagesResponse(
            messages=[
                convert.message(
                    m, participant if m.sender_id == participant.channel_user_id else None
                )
                for m in page.items
            ],
            next_page_token=page.next_token,
        )

    async def Subscribe(
        self,
        request_iterator: AsyncIterator[messaging_pb2.SubscribeRequest],
        context: Ctx,
    ) -> AsyncIterator[messaging_pb2.SubscribeResponse]:
        if self._bus is None:
            raise Unimplemented("this process runs no event bus")
        from gateway.api.subscribe import run_subscribe

        async for response in run_subscribe(
            self._bus, request_iterator, context, current_token(), stopping=self._stopping
        ):
            yield response
