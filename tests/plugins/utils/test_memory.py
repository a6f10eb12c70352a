"""release_free_heap: glibc's malloc_trim where there is one, a harmless no-op elsewhere."""

from __future__ import annotations

import platform

import pytest

from sf_datacloud_sync.utils import memory


def test_release_is_a_bool_and_safe_to_call_repeatedly():
    assert all(memory.release_free_heap() in (True, False) for _ in range(3))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_has_malloc_trim():
    assert memory._malloc_trim() is not None
    bytearray(32 * 2**20)  # something to give back
    assert memory.release_free_heap() in (True, False)
