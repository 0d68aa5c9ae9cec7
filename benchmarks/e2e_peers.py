#!/usr/bin/env python3
"""End-to-end NBD throughput: blockcrypt against nbdkit+luks, qemu-nbd+luks and
plain nbdkit file, driven by the same nbdcopy and fio jobs in one run.

Usage (root not needed):  .venv/bin/python benchmarks/e2e_peers.py [--size 1G]
Writes results.csv, results.md and results.png into --out (default bench-out/).

Every server listens on a Unix socket in a private temporary directory. The
peers cannot read LUKS2, so they serve a LUKS1 image made by qemu-img (512-byte
sectors, aes-xts-plain64); blockcrypt serves its own volumes of the same size,
with 4096- and with 512-byte sectors. Every image is first filled with random
data, so no server can answer reads from holes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT = 120  # seconds; every client run is bounded


@dataclass
class Target:
    name: str
    start: list[str]  # server command, listening on {sock}
    env: dict[str, str] | None = None


def sh(cmd: list[str], timeout: int = JOB_TIMEOUT, **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}"
        )
    return proc.stdout  # type: ignore[no-any-return]


@contextmanager
def running(target: Target, sock: Path, log: Path) -> Iterator[str]:
    cmd = [part.replace("{sock}", str(sock)) for part in target.start]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=f, env=target.env)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{target.name} did not start; see {log}")
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)


def nbdcopy(src: str, dst: str) -> float:
    """Seconds for one nbdcopy (defaults: multi-conn when offered)."""
    t0 = time.perf_counter()
    sh(["nbdcopy", "--flush", src, dst] if not dst.startswith("null:") else
       ["nbdcopy", src, dst])  # fmt: skip
    return time.perf_counter() - t0


def fio(
    uri: str, rw: str, bs: str, depth: int, jobs: int, seconds: int, size: int
) -> float:
    """Return fio's bandwidth (bytes/s) for rw=read/write, IOPS for rand*."""
    out = sh(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
         f"--bs={bs}", f"--iodepth={depth}", f"--numjobs={jobs}", f"--size={size}",
         f"--runtime={seconds}", "--time_based", "--group_reporting",
         "--output-format=json", "--verify_state_save=0"],
        timeout=seconds + JOB_TIMEOUT,
    )  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return float(side["iops"]) if rw.startswith("rand") else float(side["bw_bytes"])


def measure(uri: str, size: int, random_src: Path, seconds: int) -> dict[str, float]:
    r: dict[str, float] = {}
    r["nbdcopy_write_MBps"] = size / nbdcopy(str(random_src), uri) / 1e6
    r["nbdcopy_read_MBps"] = size / nbdcopy(uri, "null:") / 1e6
    r["fio_seq_read_1M_qd8_MBps"] = fio(uri, "read", "1M", 8, 1, seconds, size) / 1e6
    r["fio_seq_write_1M_qd8_MBps"] = fio(uri, "write", "1M", 8, 1, seconds, size) / 1e6
    r["fio_rand_read_4k_qd32_IOPS"] = fio(uri, "randread", "4k", 32, 1, seconds, size)
    r["fio_rand_write_4k_qd32_IOPS"] = fio(uri, "randwrite", "4k", 32, 1, seconds, size)
    r["fio_rand_read_4k_qd32_4conn_IOPS"] = fio(
        uri, "randread", "4k", 32, 4, seconds, size
    )
    return r


def prepare(work: Path, size: int) -> tuple[list[Target], Path]:
    bc = [sys.executable, "-m", "blockcrypt.cli", "--state-dir", str(work / "state")]
    passfile = work / "passphrase"
    passfile.write_text("benchmark-only passphrase")
    passfile.chmod(0o600)
    luks1 = work / "peers-luks1.img"
    # A short PBKDF time keeps per-connection opens cheap for the peers. qemu-img
    # sometimes fails to time so short a run ("Unable to get accurate CPU
    # usage"); retry a few times.
    for attempt in range(10):
        try:
            sh(["qemu-img", "create", "-q", "-f", "luks",
                "--object", f"secret,id=sec0,file={passfile}",
                "-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,"
                "ivgen-alg=plain64,iter-time=100", str(luks1), str(size)])  # fmt: skip
            break
        except RuntimeError:
            luks1.unlink(missing_ok=True)
            if attempt == 9:
                raise
    plain = work / "plain.img"
    with open(plain, "wb") as f:
        f.truncate(size)
    sh([*bc, "kms", "create-key", "--alias", "bench"])
    for ss in ("4096", "512"):
        sh([*bc, "create", str(work / f"bc{ss}.img"), "--size", str(size),
            "--key", "bench", "--sector-size", ss])  # fmt: skip

    def blockcrypt(image: str) -> list[str]:
        return [*bc, "serve", str(work / image), "--socket", "{sock}"]

    secret = f"secret,id=sec0,file={passfile}"
    targets = [
        Target("blockcrypt-4096", blockcrypt("bc4096.img")),
        Target("blockcrypt-512", blockcrypt("bc512.img")),
        Target(
            "nbdkit-luks",
            ["nbdkit", "--foreground", "-U", "{sock}", "--filter=luks", "file",
             str(luks1), f"passphrase=+{passfile}"],
        ),
        Target(
            "qemu-nbd-luks",
            ["qemu-nbd", "--persistent", "--shared=16", "--socket={sock}",
             "--object", secret, "--image-opts",
             f"driver=luks,key-secret=sec0,file.filename={luks1}"],
        ),
        Target(
            "nbdkit-file-plain",
            ["nbdkit", "--foreground", "-U", "{sock}", "file", str(plain)],
        ),
    ]  # fmt: skip
    random_src = work / "random.bin"
    with open(random_src, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    return targets, random_src


def write_outputs(out: Path, rows: list[dict[str, object]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = [k for k in rows[0] if k != "server"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["server", *metrics])
        w.writeheader()
        w.writerows(rows)

    by = {str(r["server"]): r for r in rows}
    peers = [p for p in ("nbdkit-luks", "qemu-nbd-luks") if p in by]
    lines = ["| metric | " + " | ".join(by) + " | blockcrypt-4096 / best peer | "
             "blockcrypt-4096 / plain nbdkit |",
             "|---|" + "---|" * (len(by) + 2)]  # fmt: skip
    for m in metrics:
        vals = [f"{float(by[s][m]):,.0f}" for s in by]  # type: ignore[arg-type]
        best = max(float(by[p][m]) for p in peers) if peers else float("nan")  # type: ignore[arg-type]
        ours = float(by["blockcrypt-4096"][m])  # type: ignore[arg-type]
        plain = float(by.get("nbdkit-file-plain", {}).get(m, float("nan")))  # type: ignore[arg-type]
        lines.append(
            f"| {m} | "
            + " | ".join(vals)
            + f" | {ours / best:.2f}x | {ours / plain:.2f}x |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(len(by) - 1, 1)
    others = [s for s in by if s != "blockcrypt-4096"]
    for i, server in enumerate(others):
        ratios = [
            float(by["blockcrypt-4096"][m]) / float(by[server][m]) for m in metrics
        ]  # type: ignore[arg-type]
        ax.bar(
            [j + i * width for j in range(len(metrics))], ratios, width, label=server
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(others) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels([m.replace("_", "\n", 2) for m in metrics], fontsize=7)
    ax.set_ylabel("blockcrypt-4096 / server (higher is better for blockcrypt)")
    ax.set_title("blockcrypt relative to each server, same machine, same run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="export size (default 1G)")
    ap.add_argument("--seconds", type=int, default=10, help="fio runtime per job")
    ap.add_argument("--out", default=str(REPO / "bench-out"))
    ap.add_argument("--only", help="comma-separated server names")
    args = ap.parse_args()
    missing = [t for t in ("nbdkit", "qemu-nbd", "qemu-img", "nbdcopy", "fio")
               if shutil.which(t) is None]  # fmt: skip
    if missing:
        print(f"needs {', '.join(missing)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from blockcrypt.cli import parse_size

    size = parse_size(args.size)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="blockcrypt-bench-") as tmp:
        work = Path(tmp)
        targets, random_src = prepare(work, size)
        for target in targets:
            if args.only and target.name not in args.only.split(","):
                continue
            sock = work / f"{target.name}.sock"
            print(f"== {target.name}", file=sys.stderr, flush=True)
            with running(target, sock, work / f"{target.name}.log") as uri:
                nbdcopy(str(random_src), uri)  # fill: no reads from holes
                result = measure(uri, size, random_src, args.seconds)
            print(f"   {result}", file=sys.stderr, flush=True)
            rows.append({"server": target.name, **result})
    write_outputs(Path(args.out), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
