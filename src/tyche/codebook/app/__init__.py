"""The code browser: a Streamlit app over one cache folder (``tyche codebook app``).

:func:`launch` starts ``streamlit run`` on :data:`APP_FILE` with the cache folder; the app
reads only that folder (the codes, the text and, for the token view and interventions, the
model stored in it).
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def launch(cache: str | os.PathLike[str], *, port: int = 8501, headless: bool = True) -> int:
    """Run the app on ``cache`` until it is stopped; returns streamlit's exit code.

    Raises ``ModuleNotFoundError`` naming the extra to install when streamlit is missing.
    """
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise ModuleNotFoundError("the code browser needs streamlit: pip install 'tyche[app]'")
    env = dict(os.environ, **{CACHE_ENV: str(Path(cache).resolve())})
    print(f"code browser on http://localhost:{port} (Ctrl-C stops it)", flush=True)
    return subprocess.call(streamlit_command(cache, port=port, headless=headless), env=env)
