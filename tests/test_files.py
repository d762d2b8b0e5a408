"""``engines.files.atomic_output``: a file appears whole under its name or not at all."""

from __future__ import annotations

import threading

import pytest

from engines.files import atomic_output


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "cache.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as partial:
            partial.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_shared_writers_of_one_cache_file_never_mix_their_bytes(tmp_path):
    """Two processes' runtimes may save the same cache file at once: each writes its own temporary
    file, so the result is one writer's whole content (with one fixed .partial name, a writer can
    rename the other's half-written file, or find its own gone)."""
    target = tmp_path / "runtime.cache"
    contents = [bytes([i]) * 2_000_000 for i in range(8)]
    start, errors = threading.Barrier(len(contents)), []

    def write(data: bytes) -> None:
        try:
            start.wait()
            with atomic_output(target, shared=True) as partial:
                with open(partial, "wb") as stream:
                    for offset in range(0, len(data), 100_000):
                        stream.write(data[offset:offset + 100_000])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c,)) for c in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert target.read_bytes() in contents
    assert list(tmp_path.iterdir()) == [target]
