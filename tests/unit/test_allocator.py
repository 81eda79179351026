"""The serving process's allocator policy (gateway/allocator.py): large buffers are reused, not faulted in anew."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from gateway.allocator import tune_allocator
from kernel.settings import Settings

# A request's worth of large buffers, several alive at once (as a sketch batch's are), allocated and freed 30 times;
# prints the minor page faults this took.
ROUNDS = """
import resource, sys
from gateway.allocator import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator(32)
def request():
    buffers = [bytearray(4 * 1024 * 1024) for _ in range(4)]  # zero-filled: every page touched
    del buffers
request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    request()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])  # (the last line: a log line may come first)


def test_tuned_process_reuses_large_buffers_instead_of_faulting_them_in() -> None:
    pages = 30 * 4 * 4 * 1024 * 1024 // 4096  # what 30 rounds touch
    default, tuned = _faults("default"), _faults("tuned")
    assert default > pages // 2, default  # glibc's defaults give the memory back and fault it in again
    assert tuned < pages // 50, tuned


def test_zero_leaves_the_defaults_and_out_of_range_is_refused() -> None:
    assert tune_allocator(0) is False
    with pytest.raises(ValueError, match="1 to 32"):
        tune_allocator(33)


@pytest.mark.parametrize("value", ["33", "-1", "abc", "1e9", "32.5", ""])
def test_out_of_range_or_odd_settings_are_refused_by_name(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_MALLOC_MMAP_THRESHOLD_MB", value)
    with pytest.raises(ValidationError, match="malloc_mmap_threshold_mb"):
        Settings()
