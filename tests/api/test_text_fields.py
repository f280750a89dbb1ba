"""U+0000 anywhere in a request's text is refused naming the field (PostgreSQL stores it
nowhere); everything else passes untouched."""

from __future__ import annotations

import pytest
from switchboard.v1 import connect_pb2, messaging_pb2

from gateway.api.text_fields import refuse_nul
from gateway.domain.errors import InvalidArgument


def _template(button_title: str) -> messaging_pb2.SendMessageRequest:
    return messaging_pb2.SendMessageRequest(
        tenant_id="t1",
        conversation_id="conv_1",
        template=messaging_pb2.Template(
            elements=[
                messaging_pb2.TemplateElement(title="first", subtitle="plain"),
                messaging_pb2.TemplateElement(
                    title="second",
                    buttons=[
                        messaging_pb2.TemplateButton(title="ok", payload="p"),
                        messaging_pb2.TemplateButton(title=button_title, payload="p"),
                    ],
                ),
            ]
        ),
    )


def test_a_clean_request_passes() -> None:
    refuse_nul(_template("Buy \u00e9\U0001f600"))
    refuse_nul(connect_pb2.GetConnectionRequest(connection_id="conn_1"))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_template("bad\x00title"), "template.elements[1].buttons[1].title"),
        (
            connect_pb2.GetConnectionRequest(connection_id="conn\x00"),
            "connection_id",
        ),
        (
            messaging_pb2.SendMessageRequest(
                tenant_id="t1",
                text="hello",
                quick_replies=[messaging_pb2.QuickReply(title="a", payload="\x00")],
            ),
            "quick_replies[0].payload",
        ),
    ],
)
def test_the_first_field_holding_nul_is_named(request_: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        refuse_nul(request_)  # type: ignore[arg-type]
    assert refused.value.field == field
