"""The error hierarchy: every error tinkerd raises on purpose is a TinkerdError, and one that stands for a builtin
error is that builtin too, so code (ours, a library's, a user's) that catches the builtin catches it."""

from __future__ import annotations

import pytest

from tinkerd.domain import errors
from tinkerd.settings import SettingsError


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.InvalidRequestError, ValueError),
        (errors.NotFoundError, LookupError),
        (errors.SettingsError, ValueError),
    ],
)
def test_errors_that_replace_a_builtin_subclass_it(error: type[errors.TinkerdError], builtin: type[Exception]) -> None:
    assert issubclass(error, errors.TinkerdError)
    with pytest.raises(builtin, match="the message"):
        raise error("the message")
    assert str(error("the message")) == "the message"  # not a KeyError's repr of its argument


def test_settings_errors_are_the_hierarchys() -> None:
    assert SettingsError is errors.SettingsError
