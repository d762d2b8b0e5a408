"""A served model that stays up: the model repository in a scratch folder, the bundled Triton on
it, the ready check before the server counts as up, and a restart whenever Triton dies.

Triton 2.51 aborts on requests anyone who reaches its HTTP port can send (``Hosts``), and a
server that is down stays down unless something starts it again. ``Service.watch`` does that:
it logs the crash, waits a back-off that doubles with each crash of the recent window (1 s,
2 s, 4 s, ... up to 30 s), starts Triton again on the same ports and runs the ready check again;
after ``RestartPolicy.max_crashes`` crashes within ``window_s`` it gives up (``CrashLoop``): a
server that dies that often is broken, not attacked once. A stop the caller asks for (``stop``,
or SIGTERM/SIGINT raised in the thread that watches) is never followed by a restart.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .ready import ReadyCheck
from .repository import ServedModel, largest_request_bytes, write_repository
from .server import EXIT_TIMEOUT_S, Ports, ServeError, TritonServer, http_stack_bytes, scratch_dir

logger = logging.getLogger(__name__)

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
POLL_S = 0.5


class CrashLoop(ServeError):
    """Triton died too often within the window; the service gave up."""


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a crashed server: after ``delay_s`` of the crashes in the window so far,
    and not at all once ``max_crashes`` fell within ``window_s`` seconds."""

    max_crashes: int = 5
    window_s: float = 600.0
    first_delay_s: float = FIRST_DELAY_S
    max_delay_s: float = MAX_DELAY_S

    def delay_s(self, recent_crashes: int) -> float:
        """The back-off before the restart that follows the ``recent_crashes``-th crash of the window."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** max(0, recent_crashes - 1))


class CrashWindow:
    """The crashes within the policy's window (a clock in seconds, ``time.monotonic`` by default)."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy, self.clock = policy, clock
        self._times: collections.deque[float] = collections.deque()

    def record(self) -> int:
        """Count one crash now; returns the crashes within the window, this one included."""
        now = self.clock()
        self._times.append(now)
        while self._times and self._times[0] <= now - self.policy.window_s:
            self._times.popleft()
        return len(self._times)

    def exhausted(self, recent: int) -> bool:
        return recent >= self.policy.max_crashes


class Service:
    """``model`` served on the bundled Triton at ``host`` and ``ports``, kept up by ``watch``."""

    def __init__(
        self,
        model: ServedModel,
        check: ReadyCheck,
        host: str = "127.0.0.1",
        ports: Ports = Ports(),
        *,
        ready_timeout_s: float = 600,
        exit_timeout_s: int = EXIT_TIMEOUT_S,
        public_http: bool = False,
        echo: Callable[[str], None] | None = None,
        policy: RestartPolicy = RestartPolicy(),
    ):
        """``check``: the request the server must answer right before it counts as up, at the first
        start and after every restart (``ReadyCheck.against_upscaler`` is computed once, before)."""
        self.model, self.check, self.ready_timeout_s, self.policy = model, check, ready_timeout_s, policy
        self.stack_bytes = http_stack_bytes(largest_request_bytes(model.artifacts, model.max_batch))
        self._scratch: Path | None = None
        self._server_options = dict(host=host, ports=ports, echo=echo, exit_timeout_s=exit_timeout_s,
                                    stack_bytes=self.stack_bytes, public_http=public_http)
        self.server: TritonServer | None = None
        self.restarts = 0

    def start(self) -> float:
        """Write the repository, start Triton, wait until it is ready and answers the ready check;
        returns the seconds that took. Raises ``ServeError`` (the server stopped) if any step fails."""
        self._scratch = scratch_dir("repository")
        try:
            repository = write_repository(self._scratch, self.model).parent
        except BaseException:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
            raise
        self.server = TritonServer(repository, **self._server_options)
        return self._bring_up()

    def _bring_up(self) -> float:
        self.server.start()
        self.server.wait_ready(self.ready_timeout_s)
        try:
            self.check.run(self.server.address, self.ready_timeout_s)
        except ServeError as exc:
            raise ServeError(f"stopped the started server: {exc}") from None
        return time.monotonic() - self.server.started

    def watch(self) -> None:
        """Keep the server up until the caller stops it (an exception raised in this thread, such as
        ``KeyboardInterrupt``); raises ``CrashLoop`` once the policy gives up."""
        crashes = CrashWindow(self.policy)
        while True:
            while self.server.process.poll() is None:
                time.sleep(POLL_S)
            self.server.wait_log()
            reason = self.server.failure()
            self.server.stop()  # its model processes, shared memory and workspace go now
            while True:
                recent = crashes.record()
                window = f"{self.policy.window_s:g} s"
                if crashes.exhausted(recent):
                    raise CrashLoop(f"Triton stopped {recent} times within {window} (--max-crashes "
                                    f"{self.policy.max_crashes}, --crash-window {self.policy.window_s:g}); gave up. "
                                    f"Last: {reason}")
                delay = self.policy.delay_s(recent)
                logger.warning("Triton stopped while serving: %s; restarting it in %g s on the same ports (crash %d "
                               "within %s; the service gives up at %d)", reason.rstrip("."), delay, recent, window,
                               self.policy.max_crashes)
                time.sleep(delay)
                try:
                    seconds = self._bring_up()
                except ServeError as exc:  # counts as a crash: the next try waits longer, or gives up
                    reason = f"the restart failed: {exc}"
                    self.server.stop()
                    continue
                self.restarts += 1
                logger.warning("restarted: ready again in %.1f s (%s)", seconds, self.check.describe())
                break

    def stop(self) -> int | None:
        """Stop Triton (in-flight requests finish within its exit timeout) and remove the scratch
        repository; returns Triton's exit code (None if it never started)."""
        try:
            return self.server.stop() if self.server is not None else None
        finally:
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)
                self._scratch = None

    def kill(self) -> None:
        """SIGKILL Triton now (a second signal while stopping); ``stop`` still cleans up."""
        if self.server is not None:
            self.server.kill()
