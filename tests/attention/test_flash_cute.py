"""Host-side parts of the FlashAttention CuTe backend that run without a GPU."""

from __future__ import annotations

import logging

import pytest

from fastvideo.attention.backends import flash_cute


def test_first_call_per_kernel_and_shape_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A CuTe kernel's first call per shape (its compile or its load from the disk cache) is
    logged with its host time; later calls are not, another shape is."""
    calls = []
    with caplog.at_level(logging.INFO, logger="fastvideo.attention.backends.flash_cute"):
        for key in ("shape a", "shape a", "shape b"):
            assert flash_cute.logged_first_call("test-kind", key,
                                                lambda key=key: calls.append(key) or 7) == 7
    assert calls == ["shape a", "shape a", "shape b"]
    lines = [r.getMessage() for r in caplog.records if "test-kind" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("FlashAttention CuTe test-kind kernel shape a: first call ")
    assert "shape b" in lines[1]
