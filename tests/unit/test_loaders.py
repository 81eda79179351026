"""Per-request loaders are freed by reference counting."""

import gc
import weakref
from typing import Any

from schema.loaders import Loaders


def test_loaders_hold_no_reference_to_themselves() -> None:
    resources: Any = object()
    gc.disable()
    try:
        loaders = Loaders(resources)
        freed = weakref.ref(loaders)
        del loaders
        assert freed() is None  # no cycle: freed without the cyclic collector
    finally:
        gc.enable()
