"""cli: the set-up the scripts share."""

import platform

import pytest

from ulmfit_jax import cli


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_sets_glibc_malloc_unless_turned_off(monkeypatch):
    monkeypatch.setenv(cli.MALLOC_ENV, "default")
    assert cli.keep_freed_memory() is False
    monkeypatch.delenv(cli.MALLOC_ENV)
    assert cli.keep_freed_memory() is True         # glibc accepted every value (mallopt returned 1)
