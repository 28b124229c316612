"""encfs-cloud as a system under test, over S3 and over file://."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from bench_s3 import ACCESS_KEY, BUCKET, REGION, SECRET_KEY
from bench_system import System
from bench_util import (
    BenchError,
    dir_bytes,
    is_mounted,
    run,
    tool,
    wait_mounted,
    wait_pids_gone,
)


class EncfsCloud(System):
    """encfs-cloud through its installed commands (init, mount.encfs-cloud, umount)."""

    base = "encfs-s3"
    label = "encfs-cloud over S3"
    uses_s3 = True
    _probe: str | None = None
    _probed = False
    _has_log_option = False
    # mount.encfs-cloud has the sealed disk cache (cache_dir option): the cache workload runs.
    has_disk_cache = False
    # Set while the cache workload mounts through the throttled proxy.
    endpoint_override = ""

    @property
    def s3_url(self) -> str:
        return self.endpoint_override or super().s3_url

    def unavailable(self) -> str | None:
        if self.uses_s3 and self.env.s3 is None:
            return "no S3 server"
        if not EncfsCloud._probed:
            EncfsCloud._probed = True
            EncfsCloud._probe = self._probe_cli()
        return EncfsCloud._probe

    @staticmethod
    def _probe_cli() -> str | None:
        for name in ("encfs-cloud", "mount.encfs-cloud"):
            if tool(name) is None:
                return f"{name} not installed (pip install -e . in the venv)"
        try:
            run([tool("encfs-cloud") or "encfs-cloud", "--help"], timeout=60)
            helptext = run([tool("mount.encfs-cloud") or "mount.encfs-cloud", "--help"]).stdout
        except BenchError as exc:
            return f"encfs-cloud not usable yet: {exc}"
        EncfsCloud._has_log_option = "log=FILE" in helptext
        EncfsCloud.has_disk_cache = "cache_dir" in helptext
        return None

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["XDG_DATA_HOME"] = str(self.run_dir / "xdg-data")
        env["XDG_CACHE_HOME"] = str(self.run_dir / "xdg-cache")
        env["XDG_RUNTIME_DIR"] = str(self.run_dir / "xdg-runtime")
        if self.uses_s3 and self.env.s3 is not None:
            env.update(
                AWS_ACCESS_KEY_ID=ACCESS_KEY,
                AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                AWS_DEFAULT_REGION=REGION,
                AWS_ENDPOINT_URL=self.s3_url,
            )
            env.update(self.env.s3.client_env)
        return env

    def prepare(self, run_dir: Path) -> None:
        super().prepare(run_dir)
        for sub in ("xdg-data", "xdg-cache", "xdg-runtime"):
            (run_dir / sub).mkdir(mode=0o700)
        if self.uses_s3:
            self.prefix = f"encfs-{uuid.uuid4().hex[:12]}"
            self.source = f"s3://{BUCKET}/{self.prefix}"
        else:
            self.store = run_dir / "store"
            self.store.mkdir()
            self.source = f"file://{self.store}"
        run(
            [
                tool("encfs-cloud") or "encfs-cloud",
                "init",
                self.source,
                "--no-passphrase",
                "--device-name",
                "bench",
            ],
            env=self._environ(),
            timeout=120,
        )

    def mount(self) -> None:
        opts = [f"cache_size={self.env.cache_size_mib}M"]
        if self.uses_s3:
            opts.append(f"endpoint_url={self.s3_url}")
        if EncfsCloud._has_log_option:
            opts.append(f"log={self.log_path}")
        if EncfsCloud.has_disk_cache:
            # Named, not left to the default, so a cold remount is sure to find it empty.
            (self.run_dir / "disk-cache").mkdir(mode=0o700, exist_ok=True)
            opts.append(f"cache_dir={self.run_dir / 'disk-cache'}")
        if self.env.encfs_opts:
            opts.append(self.env.encfs_opts)
        cmd = [tool("mount.encfs-cloud") or "mount.encfs-cloud", self.source, str(self.mnt)]
        cmd += ["-o", ",".join(opts)]
        run(
            cmd,
            env=self._environ(),
            timeout=self.env.mount_timeout,
            output=self.run_dir / "mount.out",
        )
        wait_mounted(self.mnt, self.env.mount_timeout)
        self._find_daemon()

    def unmount(self) -> None:
        pids = self.daemon_pids()
        run(
            [tool("encfs-cloud") or "encfs-cloud", "umount", str(self.mnt)],
            env=self._environ(),
            timeout=self.env.unmount_timeout,
        )
        if not wait_pids_gone(pids, 60):
            raise BenchError("encfs-cloud daemon still running after umount returned")
        if is_mounted(self.mnt):
            raise BenchError("still mounted after encfs-cloud umount")

    def cleanup(self, destroy: bool = True) -> None:
        if is_mounted(self.mnt):
            with contextlib.suppress(BenchError):
                run(
                    [tool("encfs-cloud") or "encfs-cloud", "umount", str(self.mnt)],
                    env=self._environ(),
                    timeout=120,
                    check=False,
                )
        super().cleanup(destroy)
        if destroy and self.uses_s3 and self.env.s3 is not None and self.prefix:
            with contextlib.suppress(Exception):
                self.env.s3.delete_prefix(BUCKET, self.prefix)

    def stored_bytes(self) -> int | None:
        return self._s3_stored() if self.uses_s3 else dir_bytes(self.store)

    def forget_local_cache(self) -> None:
        # The sealed disk cache (ours, or under XDG_CACHE_HOME where it defaults to).
        shutil.rmtree(self.run_dir / "disk-cache", ignore_errors=True)
        cache = self.run_dir / "xdg-cache"
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(mode=0o700)


class EncfsCloudFile(EncfsCloud):
    """encfs-cloud over a local directory (file:// store)."""

    base = "encfs-file"
    label = "encfs-cloud over file://"
    uses_s3 = False
    local = True
