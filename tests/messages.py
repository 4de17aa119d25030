"""Checks of error and log messages by what they must tell (import them
from here, not from a sibling test module).

A test of a message asserts the values, keys, files and choices it names,
not its sentences: a reworded message still passes, a message that lost a
value fails, naming the value.
"""
import pytest


def assert_mentions(message, *parts: str) -> str:
    """Assert that ``message`` (an exception, the ``ExceptionInfo`` of
    ``pytest.raises`` or a string) contains every one of ``parts``, in any
    order; returns its text."""
    if isinstance(message, pytest.ExceptionInfo):
        message = message.value
    text = str(message)
    missing = [part for part in parts if part not in text]
    assert not missing, f'{missing} not named in {text!r}'
    return text


def assert_in_order(message, *parts: str) -> None:
    """Assert that ``parts`` appear in ``message`` in this order: for two
    values whose roles the message tells apart by place (e.g. the checksum
    found, then the one expected)."""
    text = assert_mentions(message, *parts)
    places = [text.find(part) for part in parts]
    assert places == sorted(places), f'{parts} not in this order in {text!r}'
