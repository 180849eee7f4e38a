"""The code browser: a Streamlit app over one cache folder (``tyche codebook app``).

:func:`launch` starts ``streamlit run`` on :data:`APP_FILE` with the cache folder; the app
reads only that folder (the codes, the text and, for the token view and interventions, the
model stored in it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["APP_FILE", "CACHE_ENV", "launch", "streamlit_command"]

APP_FILE = Path(__file__).with_name("browser.py")
#: environment variable through which the app is told its cache folder
CACHE_ENV = "TYCHE_CODEBOOK_CACHE"


def streamlit_command(
    cache: str | os.PathLike[str], *, port: int = 8501, headless: bool = True
) -> list[str]:
    """The ``streamlit run`` command line for the app on ``cache``."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_FILE),
        "--server.port",
        str(port),
        "--server.headless",
        str(headless).lower(),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--",
        "--cache",
        str(Path(cache).resolve()),
    ]


#: seconds the server has to stop after a forwarded signal before it is killed
STOP_GRACE = 10.0
#: the signals passed on to the server
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def launch(cache: str | os.PathLike[str], *, port: int = 8501, headless: bool = True) -> int:
    """Run the app on ``cache`` until it is stopped; returns streamlit's exit code, or
    ``128 + SIGTERM`` (143) when SIGTERM stopped it.

    SIGTERM and SIGINT sent to this process are passed on to the server, which is waited for
    (killed if it has not stopped after :data:`STOP_GRACE` seconds), so it never outlives
    the launcher; after SIGINT ``KeyboardInterrupt`` is raised once it has stopped. Raises
    ``ModuleNotFoundError`` naming the extra to install when streamlit is missing.
    """
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise ModuleNotFoundError("the code browser needs streamlit: pip install 'tyche[app]'")
    env = dict(os.environ, **{CACHE_ENV: str(Path(cache).resolve())})
    print(f"code browser on http://localhost:{port} (Ctrl-C stops it)", flush=True)
    received: list[int] = []
    started: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if started and started[0].poll() is None:
            started[0].send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in FORWARDED} if main_thread else {}
    try:
        if not received:  # a signal before the start: nothing to start
            started.append(
                subprocess.Popen(streamlit_command(cache, port=port, headless=headless), env=env)
            )
        code = _wait(started[0], received) if started else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in started:  # after an error here too, the server must not outlive us
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if signal.SIGINT in received:
        raise KeyboardInterrupt
    return 128 + signal.SIGTERM if signal.SIGTERM in received else code


def _wait(proc: subprocess.Popen, received: list[int]) -> int:
    """Wait for ``proc``; once a signal was forwarded (``received``), give it
    :data:`STOP_GRACE` seconds, then kill it. Returns its exit code."""
    deadline = None
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if received and deadline is None:
                deadline = time.monotonic() + STOP_GRACE
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
