"""The scheme table: which value is which backend, and passwords kept out of messages."""

from __future__ import annotations

import pytest

from fusion_cli.errors import InvalidStorageURL
from fusion_cli.storage import redact_url
from fusion_cli.storage import url_scheme


@pytest.mark.parametrize("value, scheme", [
    ("memory:", "memory"), ("file:/tmp/x", "file"), ("/tmp/x", "file"), ("rel/dir", "file"),
    ("sqlite:x.db", "sqlite"), ("sqlite:///x.db", "sqlite"), ("SQLITE:x.db", "sqlite"),
    ("redis://h:6379/0", "redis"), ("rediss://h", "rediss"), ("unix:///tmp/r.sock", "unix"),
    ("postgresql://u@h/db", "postgresql"), ("postgres://u@h/db", "postgres"),
    ("C:notascheme", "file"),
])
def test_url_scheme(value, scheme):
    assert url_scheme(value) == scheme


@pytest.mark.parametrize("value", ["", "nosuch://x", "http://example.com/sessions"])
def test_unknown_or_empty_is_refused(value):
    with pytest.raises(InvalidStorageURL):
        url_scheme(value)


@pytest.mark.parametrize("url, shown", [
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:s3cret@h:6379/0?prefix=p:", "redis://user:***@h:6379/0?prefix=p:"),
    ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
    ("unix:///tmp/r.sock?db=0&password=s3cret", "unix:///tmp/r.sock?db=0&password=***"),
    ("postgresql://u@h/db?Password=s3cret&schema=x", "postgresql://u@h/db?Password=***&schema=x"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("sqlite:/tmp/a@b.db", "sqlite:/tmp/a@b.db"),
])
def test_redact_url_hides_every_password(url, shown):
    assert redact_url(url) == shown
