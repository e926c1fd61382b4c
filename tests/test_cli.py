"""cli: the set-up the scripts share."""

import pytest

from ulmfit_jax import cli


@pytest.mark.skipif(cli.glibc_version() is None, reason="mallopt is glibc's")
def test_keep_freed_memory_sets_glibc_malloc_unless_turned_off(monkeypatch):
    monkeypatch.setenv(cli.MALLOC_ENV, "default")
    assert cli.keep_freed_memory() is False
    monkeypatch.delenv(cli.MALLOC_ENV)
    assert cli.keep_freed_memory() is True         # glibc accepted every value (mallopt returned 1)
