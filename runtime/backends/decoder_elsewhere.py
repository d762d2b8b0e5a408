"""The pass on one backend, the decoder on another (``auto`` beside the folder's CPU graphs)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .base import Backend, BackendUnavailable, Tensors

logger = logging.getLogger(__name__)


class DecoderElsewhere(Backend):
    """The pass on one backend, the decoder on another, opened at the first decode (or check of it).

    ``auto`` runs a folder's CPU graphs (int8, the pass only) this way: decoding stays on the path
    it would take without them (torch's bf16 decoder on CPUs with bf16 units), and an app that never
    decodes never loads a decoder. ``open_decoder`` returns that backend or raises
    ``BackendUnavailable``.
    """

    def __init__(self, main: Backend, open_decoder: Callable[[], Backend], decoder: str = "vae_decoder"):
        self.main, self.name, self.device = main, main.name, main.device
        self._open_decoder, self._decoder_name = open_decoder, decoder
        self._decoder: Backend | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def opened_decoder(self) -> Backend | None:
        """The decoder's backend if a decode (or its check) has opened it, else None."""
        return self._decoder

    def decoder(self) -> Backend:
        """The decoder's backend, opened at the first call that succeeds (a failure is tried again
        next time: what failed may have been a file a rebuild replaced)."""
        with self._lock:
            if self._closed:
                raise BackendUnavailable(f"this {self.main.name} backend is closed")
            if self._decoder is None:
                try:
                    self._decoder = self._open_decoder()
                except BackendUnavailable as exc:
                    raise BackendUnavailable(f"{self.main.name} runs the pass only, and none of the backends after "
                                             f"it in auto's order can decode here: {exc}") from exc
                logger.info("%s: decoding on %s", self.main.name, self._decoder.name)
            return self._decoder

    def _for(self, component: str) -> Backend:
        return self.decoder() if component == self._decoder_name else self.main

    def check(self, component: str) -> None:
        self._for(component).check(component)

    def run(self, component: str, inputs: Tensors) -> Tensors:
        return self._for(component).run(component, inputs)

    def run_precision(self, component: str) -> str | None:
        return self._for(component).run_precision(component)

    def memory_bytes(self) -> int:
        return self.main.memory_bytes() + (self._decoder.memory_bytes() if self._decoder is not None else 0)

    def close(self) -> None:
        with self._lock:
            decoder, self._decoder, self._closed = self._decoder, None, True
            try:
                self.main.close()
            finally:
                if decoder is not None:
                    decoder.close()

