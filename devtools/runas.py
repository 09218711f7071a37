"""Start helper processes as another OS account, safely from a process that runs gRPC.

Postgres refuses to run as root, and the benchmark runs PgBouncer as the ``postgres``
account, so when the harness is root its children drop privileges.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
from typing import Any


def as_user(user: str | None, argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """*argv* and `subprocess` arguments that run it as *user* (unchanged when *user* is None
    or we are not root).

    ``setpriv`` (util-linux) drops privileges after exec, so Python can start the child with
    vfork: a plain fork() in a process with gRPC threads runs gRPC's fork handlers, which now
    and then crash the child (SIGSEGV). Without ``setpriv``, ``user=``/``group=`` drop them in
    C between fork and exec (a ``preexec_fn`` would run Python there: worse).
    """
    if user is None or os.geteuid() != 0:
        return argv, {}
    entry = pwd.getpwnam(user)
    setpriv = shutil.which("setpriv")
    if setpriv:
        ids = [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
        return [setpriv, *ids, *argv], {}
    groups = os.getgrouplist(user, entry.pw_gid)
    return argv, {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}


def raise_fd_limit() -> None:
    """Thousands of client sockets need more than the usual 1024 descriptors; children
    inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
