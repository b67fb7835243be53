"""`uv pip ARGS...` from the package sources pip is configured with on this machine.

uv reads none of pip's configuration (pip.conf files, PIP_* variables), so a machine whose pip finds packages through
a mirror, an extra index or a find-links folder (this project's CI gets torch==2.13.0+cpu that way) would send uv to
PyPI alone. pip's own option parser reads that configuration exactly as `pip install` would; its sources become uv's
arguments, and uv then picks among all of them as pip does (best match over every index, not the first index that
knows the name). Run with the venv's python: `python requirements/uv_pip.py install -c requirements/cpu.txt ...`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pip._internal.commands import create_command


def pip_sources() -> tuple[list[str], dict[str, str]]:
    """uv arguments and environment for the indexes, find-links, certificates and trusted hosts `pip install` uses."""
    options, _ = create_command("install").parse_args([])
    args = ["--index-strategy", "unsafe-best-match"]
    args += ["--no-index"] if options.no_index else ["--index-url", options.index_url]
    for url in [] if options.no_index else options.extra_index_urls:
        args += ["--extra-index-url", url]
    for location in options.find_links:
        args += ["--find-links", location]
    for host in options.trusted_hosts:
        args += ["--allow-insecure-host", host]
    # pip trusts the configured bundle, else the system's certificates (not a bundled copy, as uv does by default).
    if options.cert:
        return args, {"SSL_CERT_FILE": options.cert}
    return [*args, "--system-certs"], {}


def main(argv: list[str]) -> None:
    uv = Path(sys.executable).with_name("uv")
    subcommand, *rest = argv
    args, env = pip_sources()
    os.execve(uv, [str(uv), "pip", subcommand, "--python", sys.executable, *args, *rest], {**os.environ, **env})


if __name__ == "__main__":
    main(sys.argv[1:])
