"""The nbclient client behind ``hmlib run``, made safe to stop with Ctrl-C or SIGTERM.

nbclient's own SIGINT/SIGTERM handler only schedules a kernel shutdown: a busy kernel goes on
running its cell, and the run then fails at a later cell with an empty message (or a ZMQ
traceback once the channels are closed). Here SIGINT and SIGTERM (while the kernel lives)
interrupt the kernel, so the running cell stops with a ``KeyboardInterrupt`` shown in its output,
then the kernel is shut down at once; a cell that ignores the interrupt is abandoned after
:data:`INTERRUPT_GRACE_S` seconds (or at a second signal). No cell starts after the signal, even
when the running one finished "ok" because the interrupt never reached it (it came between two
requests, or while the cell ran code that ignores SIGINT, such as some C extensions). :meth:`InterruptibleClient.reap_kernel` finally kills
whatever is left of the kernel's process group, so no kernel survives an interrupted run.
"""
from __future__ import annotations

import asyncio
import os
import signal
from typing import Any, Callable

from jupyter_core.utils import ensure_async
from nbclient import NotebookClient

INTERRUPT_GRACE_S = 10.0  # how long the running cell may take to stop after the kernel was interrupted
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """Raised inside the client to stop the notebook after a signal, before any further cell starts."""


class InterruptibleClient(NotebookClient):
    """A NotebookClient whose SIGINT/SIGTERM interrupts, then shuts down the kernel; ``interrupted`` tells it happened.

    ``stop_signal`` is the signal that stopped the run; ``interrupted_cell`` the index of the code cell that was
    running (or, between cells, had run last) when it came, and ``cell_was_running`` which of the two it was.
    """

    def __init__(self, *args: Any, interrupt_grace_s: float = INTERRUPT_GRACE_S,
                 on_stdout_line: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_stdout_line = on_stdout_line  # called with every complete line a cell prints, as it prints it
        self._partial_line = ""
        self.interrupted = False
        self.stop_signal: signal.Signals | None = None
        self.interrupted_cell: int | None = None
        self.cell_was_running = False
        self.interrupt_grace_s = interrupt_grace_s
        self.current_cell: int | None = None  # the code cell running, or the last one that ran
        self._cell_running = False
        self._ready = False
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pending: asyncio.Future | None = None
        self._kernel_pgid: int | None = None

    async def async_start_new_kernel(self, **kwargs: Any) -> None:
        """Take over SIGINT and SIGTERM (nbclient installed its own just before), then start the kernel."""
        self._task = asyncio.current_task()
        for signum in STOP_SIGNALS:
            try:
                asyncio.get_running_loop().add_signal_handler(signum, self._on_signal, signum)
            except (RuntimeError, NotImplementedError, ValueError):  # not the main thread, or no signals (Windows)
                pass
        try:
            await super().async_start_new_kernel(**kwargs)
        finally:  # even when a Ctrl-C cancelled the start half-way: reap_kernel needs the process group
            provisioner = getattr(self.km, "provisioner", None)
            self._kernel_pgid = getattr(provisioner, "pgid", None) or getattr(provisioner, "pid", None)

    async def async_start_new_kernel_client(self) -> Any:
        """Start the client; from here on an interrupt can reach a running cell."""
        kc = await super().async_start_new_kernel_client()
        self._ready = True
        return kc

    async def async_execute_cell(self, cell: Any, cell_index: int, execution_count: int | None = None,
                                 store_history: bool = True) -> Any:
        """Execute one cell, unless a signal came; stop after a cell that finished although it was interrupted."""
        if self.interrupted:
            raise RunInterrupted(f"stopped by {self.stop_signal.name if self.stop_signal else 'a signal'}")
        runs = cell.cell_type == "code" and cell.source.strip() and \
            self.skip_cells_with_tag not in cell.get("metadata", {}).get("tags", [])
        if runs:
            self.current_cell, self._cell_running = cell_index, True
        try:
            result = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        finally:
            self._cell_running = False
        if self.interrupted:  # it finished although interrupted (the interrupt never reached it): go no further
            raise RunInterrupted(f"stopped by {self.stop_signal.name if self.stop_signal else 'a signal'}")
        return result

    def output(self, outs: list, msg: dict, display_id: str | None, cell_index: int) -> Any:
        """nbclient's output handling; complete lines of the cells' stdout also go to ``on_stdout_line``."""
        content = msg.get("content") or {}
        if self.on_stdout_line is not None and msg.get("msg_type") == "stream" and content.get("name") == "stdout":
            *lines, self._partial_line = (self._partial_line + str(content.get("text", ""))).split("\n")
            for line in lines:
                self.on_stdout_line(line)
        return super().output(outs, msg, display_id, cell_index)

    def _on_signal(self, signum: int = signal.SIGINT) -> None:
        """First signal: interrupt the kernel, stop after the grace period; a later one (or no kernel yet): stop now."""
        first = not self.interrupted
        if first:
            self.stop_signal = signal.Signals(signum)
            self.interrupted_cell, self.cell_was_running = self.current_cell, self._cell_running
        self.interrupted = True
        self.shutdown_kernel = "immediate"  # read by nbclient's cleanup: shutdown_kernel(now=True)
        if first and self._ready and self.km is not None:
            self._pending = asyncio.ensure_future(ensure_async(self.km.interrupt_kernel()))
            self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # a dead kernel: nothing to do
            self._timer = asyncio.get_running_loop().call_later(self.interrupt_grace_s, self._stop)
        else:
            self._stop()

    def _stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()  # nbclient's cleanup (kernel shutdown) still runs on the way out

    def reap_kernel(self) -> bool:
        """Kill the kernel's process group if any of it is still alive; return whether something was killed."""
        if self._timer is not None:
            self._timer.cancel()
        pgid = self._kernel_pgid
        if pgid is None or not hasattr(os, "killpg") or pgid == os.getpgrp():  # never our own group
            return False
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False  # nothing of the kernel is left
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True


__all__ = ["INTERRUPT_GRACE_S", "STOP_SIGNALS", "InterruptibleClient", "RunInterrupted"]
