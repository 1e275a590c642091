"""Training throughput with the scenes (a) in memory, (b) as pyramids in a local directory,
(c) as pyramids behind an S3 endpoint with ~20 ms added per request; same model, data and steps.

    python bench/train_throughput.py [--config jobs/configs/fmow_demo_ats.yaml] [--manifest URI]
        [--scenes 24] [--epochs 2] [--latency-ms 20] [--micro-batches 2] [--object-server]
        [--without-read-ahead] [--also-max-gap BYTES] [--also-shard PX] [--set KEY=VALUE] [--json]

Every setting runs the per-worker loop of ``pipeline.train.loop`` (one process, no Ray: this
measures the data path, not Ray's start-up) from the same initial weights and sampling seed:
one warm-up epoch each (the reader's metadata and shard-index caches are warm in a long run
too), then ``--epochs`` rounds in which every setting trains one epoch, in an order that
rotates from round to round, so that the machine's changing load falls on all of them alike. The low-resolution views are computed once and shared, so the settings
differ only in where the attended patches come from:
  (a) ``memory``: ``TensorPyramidSource`` over every level of every scene loaded into RAM;
  (b) ``local``: ``ZarrPixelSource`` over the local pyramids;
  (c) ``s3``: ``ZarrPixelSource`` over ``s3://`` copies of the pyramids in a real SeaweedFS
      (``pipeline.store.seaweed``), behind ``bench.http_proxy``, which waits ``--latency-ms``
      before forwarding each request (metadata, shard index or chunk range alike), as a remote
      object store would answer later. Both run on this machine's cores; ``--store-nice N``
      lowers their priority, a nearer stand-in for a store whose CPU is elsewhere;
  (c') ``s3_no_read_ahead`` (with ``--without-read-ahead``): (c) with ``data.read_ahead``
      off, so every step starts by waiting for its first read;
  (c'') ``s3_gap_N`` (with ``--also-max-gap N``): (c) with ``reader.max_gap`` N bytes, so
      that merging more of a shard into one request is measured beside the default;
  (c''') ``s3_shard_N`` (with ``--also-shard N``): (c) over the same scenes written again with
      N px shards (fewer, larger shard objects: fewer requests for the same patches);
  (d) ``s3_object_server`` (with ``--object-server``): the same through
      ``bench/object_server.py``, a light S3 GET server that waits the same latency itself
      (no proxy hop), for comparison with earlier figures.
The servers run in their own processes on 127.0.0.1 (their CPU still counts: same cores).
Also printed: bytes read per sample against a full-resolution CNN that must read every level-0
shard of a scene (compressed bytes in the store, and raw uint8 bytes).
Without ``--manifest`` a small fMoW-layout sample is generated and ingested under
``data/bench`` (reused by later runs). With ``--json`` the last line is one JSON object with
``samples_per_s`` per setting and ``s3_over_memory`` (setting c over a).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.store import storage

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "data" / "bench"


def make_manifest(scenes: int) -> str:
    """A generated sample of ``scenes`` train scenes of 1000-2000 px, ingested under
    ``data/bench`` (skipped when already there)."""
    from pipeline.synth.demo import make_demo_data
    from pipeline.synth.fmow_sample import SampleSpec

    spec = SampleSpec(splits=(("train", scenes), ("val", 4)), size_range=(1000, 2000),
                      large_fraction=0.0)
    return make_demo_data(DATA, spec, coarsest=256, workers=2, progress_s=30,
                          say=lambda m: print(m, file=sys.stderr)).manifest


def memory_source(uris: list[str]):
    """(a): every level of every scene as uint8 tensors in RAM."""
    import zarr

    from models.memory import TensorPyramidSource

    pyramids = {}
    for uri in uris:
        group = zarr.open_group(uri, mode="r", zarr_format=3)
        levels = sorted(group.array_keys(), key=int)
        pyramids[uri] = [torch.from_numpy(np.asarray(group[k][:])) for k in levels]
    return TensorPyramidSource(pyramids)


def level0_bytes(uri: str) -> int:
    """Bytes of every level-0 shard object: what reading the whole scene at full resolution fetches."""
    return sum(len(storage.read_bytes(u)) for u in storage.list_prefix(storage.join_uri(uri, "0")))


def _wait_http(endpoint: str, proc, what: str) -> None:
    import urllib.error
    import urllib.request

    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer on {endpoint}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_seaweed_behind_proxy(work: Path, latency_s: float, nice: int = 0):
    """SeaweedFS with a ``bench-train`` bucket and the latency proxy in front of it, each in
    its own process on 127.0.0.1; sets ``AWS_*`` to the server. ``nice``: their scheduling
    priority (0: the same as the training loop's). Returns (server, proxy process, server
    endpoint, proxy endpoint)."""
    import subprocess

    from pipeline.store.seaweed import start_seaweed

    server = start_seaweed(work / "seaweed", access_key="bench", secret_key="bench",
                           buckets=["bench-train"])
    _aws_env(server.endpoint)
    pport = _free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "bench.http_proxy", server.endpoint,
                              "--latency-ms", str(latency_s * 1000), "--port", str(pport)],
                             cwd=ROOT, stdout=subprocess.DEVNULL)
    proxy_endpoint = f"http://127.0.0.1:{pport}"
    _wait_http(proxy_endpoint, proxy, "latency proxy")
    if nice:
        os.setpriority(os.PRIO_PGRP, server.pid, nice)  # weed leads its own process group
        os.setpriority(os.PRIO_PROCESS, proxy.pid, nice)
    return server, proxy, server.endpoint, proxy_endpoint


def start_object_server(root: Path, latency_s: float):
    """``bench/object_server.py`` over ``root`` in its own process; returns (process, endpoint)."""
    import subprocess

    port = _free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "object_server.py"), "--root",
                               str(root), "--latency-ms", str(latency_s * 1000), "--port",
                               str(port)], stdout=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_http(endpoint, server, "object server")
    return server, endpoint


def _aws_env(endpoint: str) -> None:
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint})


def proxy_counts(proxy_endpoint: str) -> dict:
    import urllib.request

    from bench.http_proxy import COUNTS_PATH

    with urllib.request.urlopen(proxy_endpoint + COUNTS_PATH, timeout=10) as response:
        return json.loads(response.read())


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except Exception:
        proc.kill()


def rewrite_scene(src_uri: str, dst_root: str, shard: int) -> str:
    """The local pyramid ``src_uri`` written again under ``dst_root`` with ``shard`` px shards
    (same chunks, levels and attributes); returns the new scene URI."""
    import zarr

    from pipeline.store.pyramid import write_pyramid

    group = zarr.open_group(src_uri, mode="r", zarr_format=3)
    levels = sorted(group.array_keys(), key=int)
    last = group[levels[-1]]
    return write_pyramid(dst_root, os.path.basename(src_uri.rstrip("/")),
                         np.asarray(group[levels[0]][:]), dict(group.attrs["scene"]),
                         coarsest=max(last.shape[1:]), chunk=group[levels[0]].chunks[1],
                         shard=shard)


def copy_scene(src_uri: str, dst_uri: str) -> None:
    for uri in storage.list_prefix(src_uri):
        rel = os.path.relpath(uri, src_uri)
        storage.write_bytes(storage.join_uri(dst_uri, rel), storage.read_bytes(uri))


@dataclass
class Setting:
    """One way of serving the patches: its name, source, scene keys and ``AWS_ENDPOINT_URL``;
    ``read_ahead``: overrides ``data.read_ahead`` for this setting (None: the config's)."""

    name: str
    source: object
    keys: np.ndarray
    endpoint: str | None = None
    read_ahead: bool | None = None

    def activate(self) -> None:
        if self.endpoint is not None:
            os.environ["AWS_ENDPOINT_URL"] = self.endpoint


def cpu_by_role(roles: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far: ``loop`` this process (the training loop and its threads), each
    of ``roles`` (name -> pid: SeaweedFS, the proxy) with its descendants, and ``reader``
    every other process below this one (the readers' child processes)."""
    from pipeline.stack.process import cpu_seconds, process_tree

    trees = {name: process_tree(pid) for name, pid in roles.items()}
    taken = {pid for tree in trees.values() for pid in tree}
    below = [pid for pid in process_tree(os.getpid())[1:] if pid not in taken]
    return {"loop": cpu_seconds([os.getpid()]), "reader": cpu_seconds(below),
            **{name: cpu_seconds(tree) for name, tree in trees.items()}}


def measure(settings: list[Setting], views, sizes, labels, config, epochs: int, seed: int = 0,
            roles: dict[str, int] | None = None):
    """A warm-up epoch per setting, then ``epochs`` rounds of one epoch per setting, the order
    rotating each round (so drifts in the machine's load fall on every setting alike); the
    same initial weights and sampling seed everywhere. Returns per-sample metrics by name,
    with ``cpu_ms_per_sample`` by role (``cpu_by_role`` of ``roles``) added."""
    from models.registry import create_model
    from pipeline.train.loop import EpochStats, StepRunner, train_epoch

    bs = config.data.batch_size

    def batches(keys, epoch):
        order = np.random.default_rng(epoch).permutation(len(keys))
        return [{"key": keys[order[i:i + bs]], "view": views[order[i:i + bs]],
                 "size": sizes[order[i:i + bs]], "label": labels[order[i:i + bs]]}
                for i in range(0, len(keys), bs)]

    runners = {}
    for s in settings:
        torch.manual_seed(seed)
        model = create_model(config.model.name, **config.model.overrides)
        runners[s.name] = StepRunner(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=config.optim.lr),
            source=s.source, micro_batches=config.data.micro_batches,
            ramp=config.data.ramp_micro_batches,
            read_ahead=config.data.read_ahead if s.read_ahead is None else s.read_ahead,
            clip_norm=config.optim.clip_norm, generator=torch.Generator().manual_seed(seed + 1))
        s.activate()
        train_epoch(runners[s.name], batches(s.keys, 0), 0)  # warm-up: caches, first-touch
    totals = {s.name: EpochStats() for s in settings}
    cpu = {s.name: dict.fromkeys(cpu_by_role(roles or {}), 0.0) for s in settings}
    for epoch in range(1, epochs + 1):
        shift = (epoch - 1) % len(settings)
        for s in settings[shift:] + settings[:shift]:
            s.activate()
            before = cpu_by_role(roles or {})
            stats = train_epoch(runners[s.name], batches(s.keys, epoch), epoch)
            after = cpu_by_role(roles or {})
            for role in cpu[s.name]:
                cpu[s.name][role] += after[role] - before[role]
            totals[s.name] = EpochStats.from_vector(totals[s.name].as_vector() + stats.as_vector())
    results = {}
    for s in settings:
        m = results[s.name] = totals[s.name].metrics("train")
        n = max(totals[s.name].samples, 1)
        m["cpu_ms_per_sample"] = {role: 1000 * v / n for role, v in cpu[s.name].items()}
        shares = "  ".join(f"{r} {v:5.1f}" for r, v in m["cpu_ms_per_sample"].items())
        print(f"  {s.name:<16} {m['train/samples_per_s']:8.2f} samples/s   data wait "
              f"{100 * m['train/data_wait_fraction']:5.1f}%   {m['train/bytes_per_sample']:>10,.0f} B/sample"
              f"   {m['train/requests_per_sample']:6.2f} requests/sample   CPU ms/sample: {shares}",
              flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "jobs" / "configs" / "fmow_demo_ats.yaml")
    parser.add_argument("--manifest", help="manifest of local pyramids (default: generate one)")
    parser.add_argument("--scenes", type=int, default=24, help="train scenes used")
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per setting")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--micro-batches", type=int, default=None, help="override data.micro_batches")
    parser.add_argument("--concurrency", type=int, default=None, help="override reader.concurrency")
    parser.add_argument("--max-gap", type=int, default=None, help="override reader.max_gap")
    parser.add_argument("--also-max-gap", type=int, action="append", default=[], metavar="BYTES",
                        help="add a row: setting (c) with reader.max_gap BYTES, side by side "
                             "(repeatable)")
    parser.add_argument("--also-shard", type=int, action="append", default=[], metavar="PX",
                        help="add a row: setting (c) with the scenes written again with PX px "
                             "shards (same chunks), side by side (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config override, as for jobs/train_fmow.py")
    parser.add_argument("--store-nice", type=int, default=0,
                        help="run SeaweedFS and the proxy at this nice level (they stand for a "
                             "remote store, whose CPU a real worker would not share; 0: same "
                             "priority as training)")
    parser.add_argument("--object-server", action="store_true",
                        help="add setting (d): bench/object_server.py instead of SeaweedFS")
    parser.add_argument("--without-read-ahead", action="store_true",
                        help="add a row: setting (c) with data.read_ahead off, side by side")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from pipeline.read.reader import ZarrPixelSource
    from pipeline.read.settings import EXACT_READS
    from pipeline.read.source import ZarrSourceFactory, open_split
    from pipeline.train.config import load_config
    from pipeline.train.driver import resolve_config

    manifest_uri = args.manifest or make_manifest(args.scenes)
    sets = [] if args.micro_batches is None else [f"data.micro_batches={args.micro_batches}"]
    sets += [f"reader.{k}={v}" for k, v in (("concurrency", args.concurrency),
                                            ("max_gap", args.max_gap)) if v is not None]
    sets += args.set
    config = load_config(args.config, sets)
    split = open_split(manifest_uri, "train", config.reader, args.scenes)
    config = resolve_config(config, list(split.classes))
    keys, sizes, labels = split.rows["key"], split.rows["size"], split.rows["label"]
    from models.registry import create_model

    view_size = create_model(config.model.name, **config.model.overrides).view_size
    local = ZarrPixelSource.from_settings(EXACT_READS)
    views = local.view(list(keys), view_size).numpy()
    full = np.array([level0_bytes(k) for k in keys], dtype=np.float64)
    raw = (sizes[:, 0] * sizes[:, 1] * 3).astype(np.float64)
    print(f"{len(keys)} scenes, mean {raw.mean() / 3:,.0f} px, model {config.model.name} "
          f"{config.model.overrides}, batch {config.data.batch_size}, micro-batches "
          f"{config.data.micro_batches}, read ahead {config.data.read_ahead}, reader {config.reader}, {args.epochs} measured epochs "
          f"after 1 warm-up, interleaved; {args.latency_ms:g} ms added per S3 request; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    root = os.path.dirname(os.path.commonprefix([str(k) for k in keys]).rstrip("/"))
    s3_keys = np.array([f"s3://bench-train/pyr/{os.path.relpath(k, root)}" for k in keys])
    settings = [Setting("memory", memory_source(list(keys)), keys),
                Setting("local", split.source_factory(), keys)]
    processes, stoppers = [], []
    with tempfile.TemporaryDirectory(prefix="bench-objects-") as objects:
        try:
            server, proxy, server_endpoint, endpoint = start_seaweed_behind_proxy(
                Path(objects), args.latency_ms / 1000, args.store_nice)
            stoppers.append(lambda: server.stop(timeout_s=2))  # throwaway data: no need to wait
            processes.append(proxy)
            for k, s3k in zip(keys, s3_keys, strict=True):  # uploaded directly, no latency
                copy_scene(str(k), str(s3k))
            settings.append(Setting("s3", split.source_factory(), s3_keys, endpoint))
            for shard in args.also_shard:  # written locally, then uploaded as (c)'s were
                local_root = f"{objects}/shard{shard}"
                shard_keys = np.array([f"s3://bench-train/shard{shard}/{os.path.basename(k)}"
                                       for k in keys])
                for k, s3k in zip(keys, shard_keys, strict=True):
                    copy_scene(rewrite_scene(str(k), local_root, shard), str(s3k))
                settings.append(Setting(f"s3_shard_{shard}", split.source_factory(), shard_keys,
                                        endpoint))
            for gap in args.also_max_gap:
                factory = ZarrSourceFactory(dataclasses.replace(config.reader, max_gap=gap))
                settings.append(Setting(f"s3_gap_{gap}", factory(), s3_keys, endpoint))
            if args.without_read_ahead:
                settings.append(Setting("s3_no_read_ahead", split.source_factory(), s3_keys,
                                        endpoint, read_ahead=False))
            if args.object_server:
                for k in keys:  # the object server's bucket is a directory: copy the files in
                    shutil.copytree(str(k), f"{objects}/files/bench-train/pyr/{os.path.relpath(k, root)}")
                obj, obj_endpoint = start_object_server(Path(objects) / "files", args.latency_ms / 1000)
                processes.append(obj)
                settings.append(Setting("s3_object_server", split.source_factory(), s3_keys,
                                        obj_endpoint))
            results = measure(settings, views, sizes, labels, config, args.epochs,
                              roles={"seaweedfs": server.pid, "proxy": proxy.pid})
            served = proxy_counts(endpoint)["total"]
        finally:
            for proc in processes:
                stop(proc)
            for stop_server in stoppers:
                stop_server()

    sps = {k: v["train/samples_per_s"] for k, v in results.items()}
    read = results["local"]["train/bytes_per_sample"]
    ratio = sps["s3"] / sps["memory"]
    extra = (f"; object server / memory {sps['s3_object_server'] / sps['memory']:.2f}"
            if "s3_object_server" in sps else "")
    if "s3_no_read_ahead" in sps:
        extra += f"; s3 without read ahead / memory {sps['s3_no_read_ahead'] / sps['memory']:.2f}"
    print(f"\ns3 / memory samples per second: {ratio:.2f} (target >= 0.90); local / memory "
          f"{sps['local'] / sps['memory']:.2f}{extra}; S3 requests served {served} (incl. warm-up)")
    print(f"bytes per sample: read {read:,.0f} vs full-resolution CNN {full.mean():,.0f} compressed "
          f"({full.mean() / max(read, 1):.0f}x) / {raw.mean():,.0f} raw uint8 "
          f"({raw.mean() / max(read, 1):.0f}x)")
    if args.json:
        print(json.dumps({
            "samples_per_s": sps,
            "s3_over_memory": ratio,
            "s3_requests_served": served,
            "data_wait_fraction": {k: v["train/data_wait_fraction"] for k, v in results.items()},
            "cpu_ms_per_sample": {k: v["cpu_ms_per_sample"] for k, v in results.items()},
            "requests_per_sample": {k: v["train/requests_per_sample"] for k, v in results.items()},
            "bytes_per_sample": read,
            "full_resolution_bytes_per_sample": float(full.mean()),
            "full_resolution_raw_bytes_per_sample": float(raw.mean()),
            "latency_ms": args.latency_ms,
            "store_nice": args.store_nice,
            "scenes": len(keys),
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
