"""A throwaway OpenLDAP ``slapd`` for tests and benchmarks: own config, mdb database and
port, ppolicy loaded; no system service involved (the Debian postinst's slapd is not used).

Stop/start keep the database, so tests can take the directory away mid-batch and bring it
back with the same entries.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
MODULE_DIR = next((d for d in ("/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/ldap",
                               "/usr/lib/openldap", "/usr/libexec/openldap")
                   if Path(d, "back_mdb.so").exists()), "/usr/lib/ldap")
SCHEMA_DIR = "/etc/ldap/schema" if Path("/etc/ldap/schema").is_dir() else "/etc/openldap/schema"
BASE_DN = "dc=hopnhat,dc=test"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PW = "test-secret-not-real"

CONF = """\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
include {schema}/nis.schema
modulepath {modules}
moduleload back_mdb
moduleload ppolicy
pidfile {dir}/slapd.pid
database mdb
suffix "{base}"
rootdn "{admin}"
rootpw {password}
directory {dir}/db
maxsize 1073741824
index objectClass eq
index uid eq,sub
index mail eq,sub
index employeeNumber eq
index member eq
overlay ppolicy
ppolicy_default "cn=default,ou=policies,{base}"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SlapdServer:
    """``slapd -f <tmp>/slapd.conf -h ldap://127.0.0.1:<port>/`` in the foreground-ish."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="hopnhat-slapd-"))
        (self.dir / "db").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._atexit = False
        (self.dir / "slapd.conf").write_text(CONF.format(
            schema=SCHEMA_DIR, modules=MODULE_DIR, dir=self.dir, base=BASE_DN, admin=ADMIN_DN,
            password=ADMIN_PW))

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}/"

    def start(self) -> SlapdServer:
        # -d 0 keeps slapd in the foreground so the Popen is the server itself
        if not self._atexit:  # a crashed script must not leave a slapd behind
            atexit.register(self.stop)
            self._atexit = True
        self.proc = subprocess.Popen(
            [SLAPD, "-f", str(self.dir / "slapd.conf"), "-h", self.url, "-d", "0"],
            stdout=subprocess.DEVNULL, stderr=(self.dir / "slapd.log").open("ab"),
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {(self.dir / 'slapd.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError("slapd did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def ldap_search(server: SlapdServer, flt: str, attrs: list[str] | None = None) -> list[dict]:
    """Entries visible to a plain ldap3 admin search (what tests assert on)."""
    import ldap3

    conn = ldap3.Connection(ldap3.Server(server.url.rstrip("/")), ADMIN_DN, ADMIN_PW,
                            auto_bind=True)
    try:
        conn.search(BASE_DN, flt, attributes=attrs or ["*"])
        return [{"dn": e.entry_dn, **e.entry_attributes_as_dict} for e in conn.entries]
    finally:
        conn.unbind()


if __name__ == "__main__":  # manual use: python -m tests.ldap_server
    srv = SlapdServer().start()
    print(srv.url, ADMIN_DN, ADMIN_PW, srv.dir)
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
    srv.cleanup()
    os._exit(0)


def wipe_directory(server: SlapdServer) -> None:
    """Delete everything below the base DN (deepest first), keeping the base itself."""
    import ldap3

    conn = ldap3.Connection(ldap3.Server(server.url.rstrip("/")), ADMIN_DN, ADMIN_PW,
                            auto_bind=True)
    try:
        conn.search(BASE_DN, "(objectClass=*)", attributes=[])
        dns = sorted((e.entry_dn for e in conn.entries if e.entry_dn.lower() != BASE_DN),
                     key=lambda d: -d.count(","))
        for dn in dns:
            conn.delete(dn)
    finally:
        conn.unbind()
