"""One torch thread per test: tiny models gain nothing from threads, and on a busy 2-core machine they contend.

Import the autouse fixture into a test module (``from single_thread import one_thread  # noqa: F401``).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
