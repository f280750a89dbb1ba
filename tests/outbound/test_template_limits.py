"""Generic templates Meta would refuse are refused before anything is stored: a card that is a
title alone (Meta then drops the whole carousel), and titles past Meta's lengths."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from switchboard.v1 import messaging_pb2

from gateway.domain.errors import InvalidArgument
from gateway.domain.outbound import (
    ContentKind,
    OutboundLimits,
    OutboundMessage,
    TemplateButton,
    TemplateElement,
    validate,
)
from tests.outbound.conftest import Out
from tests.outbound.test_refusals import refused, stored_messages

IMAGE = "https://cdn.example/card.png"
BUY = TemplateButton(type="web_url", title="Buy", url="https://shop.example/buy")


def refusal(*elements: TemplateElement) -> str:
    """The field named by the refusal."""
    message = OutboundMessage(kind=ContentKind.TEMPLATE, recipient_id="1", elements=elements)
    with pytest.raises(InvalidArgument) as caught:
        validate(message, OutboundLimits())
    return caught.value.field


def accepted(*elements: TemplateElement) -> None:
    validate(
        OutboundMessage(kind=ContentKind.TEMPLATE, recipient_id="1", elements=elements),
        OutboundLimits(),
    )


def test_a_card_needs_something_beside_its_title() -> None:
    assert refusal(TemplateElement(title="Boots")) == "template.elements[0]"
    assert refusal(TemplateElement(title="A", subtitle="x"), TemplateElement(title="B")) == (
        "template.elements[1]"
    )
    for element in (
        TemplateElement(title="Boots", subtitle="Size 42"),
        TemplateElement(title="Boots", image_url=IMAGE),
        TemplateElement(title="Boots", default_action_url="https://shop.example/b"),
        TemplateElement(title="Boots", buttons=(BUY,)),
    ):
        accepted(element)


def test_titles_are_held_to_metas_lengths() -> None:
    assert refusal(TemplateElement(title="t" * 81, image_url=IMAGE)) == "template.elements[0].title"
    assert refusal(TemplateElement(title="Boots", subtitle="s" * 81)) == (
        "template.elements[0].subtitle"
    )
    long_button = TemplateButton(type="postback", title="b" * 21, payload="P")
    assert refusal(TemplateElement(title="Boots", buttons=(long_button,))) == (
        "template.elements[0].buttons[0].title"
    )
    # The limits count characters, not bytes: 80 of them in any script pass.
    accepted(TemplateElement(title="é" * 80, subtitle="ß" * 80, buttons=(BUY,)))


CARDS: list[tuple[str, dict[str, Any], str]] = [
    ("title_alone", {"title": "Boots"}, "template.elements[0]"),
    ("title_over_80", {"title": "t" * 81, "subtitle": "Size 42"}, "template.elements[0].title"),
]


@pytest.mark.parametrize(("name", "card", "field"), CARDS, ids=[c[0] for c in CARDS])
async def test_sendmessage_refuses_such_cards_and_stores_and_sends_nothing(
    out: Out, name: str, card: dict[str, Any], field: str
) -> None:
    template = messaging_pb2.Template(elements=[messaging_pb2.TemplateElement(**card)])
    code, info = await refused(out, idempotency_key=f"k-{name}", template=template)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.metadata["field"] == field
    assert await stored_messages(out) == 0
    assert await out.bodies() == []


def test_a_url_that_does_not_parse_is_named_not_an_internal_error() -> None:
    broken = "https://[x/boots.png"
    assert refusal(TemplateElement(title="Boots", image_url=broken)) == (
        "template.elements[0].image_url"
    )
    button = TemplateButton(type="web_url", title="Buy", url=broken)
    assert refusal(TemplateElement(title="Boots", buttons=(button,))) == (
        "template.elements[0].buttons[0].url"
    )
