"""Benchmark nasd: start-up time, GET and POST rates, peak memory and claim update latency.

Usage: python bench/run.py --accounts 1000,10000,100000 --rounds 3 --out bench/results.md

Run it with the Python of a virtualenv that has nasd's dependencies, nkeys and nats-py.
See bench/README.md for what each figure means and what the benchmark needs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPOSITORY = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

try:
    import generate
    import load
    from report import CountResult, Settings, Tools, git_commit, render_report
    from servers import (
        BenchError,
        Processes,
        free_port,
        log_problems,
        nasd_config,
        peak_rss_mib,
        start_nasd,
        start_nats_server,
        wait_for_account_count,
        wait_for_nats_connection,
    )
except ModuleNotFoundError as missing:
    sys.exit(
        f"bench/run.py needs the Python package {missing.name!r}. Run it with the Python of nasd's "
        "virtualenv, or install nasd with its test extras: pip install '.[test]'"
    )

# Keys that wrk requests at random in the GET run, taken from the stored accounts.
GET_KEY_COUNT = 1000

# wrk threads for the GET and the concurrent POST runs.
WRK_THREADS = 2


def parse_counts(text: str) -> list[int]:
    counts = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(
                f"invalid account count {part!r}: expected positive integers, e.g. 1000,10000"
            )
        counts.append(int(part))
    return counts


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark nasd on 127.0.0.1 with N stored accounts (see bench/README.md).",
    )
    parser.add_argument(
        "--accounts",
        type=parse_counts,
        default=[1000, 10000, 100000],
        help="comma-separated numbers of stored accounts, one table column each (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds per account count, each with a fresh nasd; the table shows the median (default 3)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 accounts, 1 round, 3-second load runs")

    parser.add_argument("--get-seconds", type=float, default=10.0, help="duration of the wrk GET run (default 10)")
    parser.add_argument(
        "--sequential-posts",
        type=int,
        default=1000,
        help="accounts POSTed by the sequential client, at most (default 1000)",
    )
    parser.add_argument(
        "--sequential-seconds",
        type=float,
        default=10.0,
        help="time limit of the sequential POST run, in seconds (default 10)",
    )
    parser.add_argument(
        "--concurrent-seconds",
        type=float,
        default=10.0,
        help="duration of the concurrent POST run, in seconds (default 10)",
    )
    parser.add_argument(
        "--concurrent-pool",
        type=int,
        default=20000,
        help="fresh accounts generated for the concurrent POST run; too few make its rate too low (default 20000)",
    )
    parser.add_argument(
        "--notify-posts", type=int, default=200, help="accounts POSTed to measure claim update latency (default 200)"
    )

    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for nasd to serve a stored account (default 600)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="folder to keep generated accounts in between runs (default: inside the temporary folder)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with logs, stores and configs")

    parser.add_argument(
        "--wrk",
        default=shutil.which("wrk"),
        help="wrk executable (default: wrk on PATH). Without wrk, the GET figures are skipped",
    )
    parser.add_argument("--twistd", help="twistd executable (default: beside this Python, then on PATH)")
    parser.add_argument("--nats-server", help="nats-server executable (default: beside this Python, then on PATH)")

    arguments = parser.parse_args(argv)
    if arguments.rounds < 1:
        parser.error("--rounds must be at least 1")
    return arguments


def settings_from(arguments: argparse.Namespace) -> Settings:
    if arguments.quick:
        return Settings(
            counts=[1000],
            rounds=1,
            get_seconds=3,
            get_keys=GET_KEY_COUNT,
            get_connections=32,
            wrk_threads=WRK_THREADS,
            sequential_posts=200,
            sequential_seconds=3,
            concurrent_pool=3000,
            concurrent_clients=16,
            concurrent_seconds=3,
            notify_posts=50,
            startup_timeout=arguments.startup_timeout,
            workers=os.cpu_count() or 1,
        )
    return Settings(
        counts=arguments.accounts,
        rounds=arguments.rounds,
        get_seconds=arguments.get_seconds,
        get_keys=GET_KEY_COUNT,
        get_connections=32,
        wrk_threads=WRK_THREADS,
        sequential_posts=arguments.sequential_posts,
        sequential_seconds=arguments.sequential_seconds,
        concurrent_pool=arguments.concurrent_pool,
        concurrent_clients=16,
        concurrent_seconds=arguments.concurrent_seconds,
        notify_posts=arguments.notify_posts,
        startup_timeout=arguments.startup_timeout,
        workers=os.cpu_count() or 1,
    )


def find_program(name: str, explicit: str | None) -> str | None:
    """Return *explicit*, else *name* beside the running Python (the virtualenv), else on PATH."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def find_tools(arguments: argparse.Namespace) -> Tools:
    twistd = find_program("twistd", arguments.twistd)
    if twistd is None:
        raise BenchError("twistd was not found. Install nasd's dependencies (pip install .) or pass --twistd")
    wrk = arguments.wrk if arguments.wrk and os.access(arguments.wrk, os.X_OK) else None
    try:
        import nats  # noqa: F401

        nats_py = True
    except ModuleNotFoundError:
        nats_py = False
    return Tools(twistd, wrk, find_program("nats-server", arguments.nats_server), nats_py)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_count(
    settings: Settings, tools: Tools, processes: Processes, workdir: Path, cache: Path, count: int
) -> CountResult:
    """Generate and store *count* accounts, then run every round against them."""
    progress(f"N={count:,}: generating accounts (or reading them from {cache})")
    accounts = generate.load_or_generate(
        cache, count, settings.sequential_posts, settings.concurrent_pool, settings.notify_posts, settings.workers
    )
    progress(
        f"N={count:,}: {'generated' if accounts.generated else 'reused'} the accounts "
        f"({accounts.seconds:.1f} s to generate {settings.generated_total(count):,})"
    )
    stored = generate.read_accounts(accounts.stored)
    store = workdir / f"store-{count}"
    started = time.monotonic()
    generate.write_store(store, stored + [(accounts.system_account, accounts.system_account_jwt)])
    result = CountResult(count, accounts.seconds, accounts.generated, time.monotonic() - started)
    progress(f"N={count:,}: wrote the sharded store in {result.store_seconds:.1f} s")

    stored_keys = [key for key, _ in stored]
    get_keys = random.Random(count).sample(stored_keys, min(settings.get_keys, len(stored_keys)))
    sequential = generate.read_accounts(accounts.sequential)
    notify = generate.read_accounts(accounts.notify)
    posted_keys = [key for key, _ in sequential + notify + generate.read_accounts(accounts.concurrent)]

    for number in range(1, settings.rounds + 1):
        folder = workdir / f"n{count}-round{number}"
        folder.mkdir()
        try:
            figures = run_round(
                settings, tools, processes, folder, store, accounts, count, get_keys, sequential, notify
            )
        finally:
            remove_posted(store, posted_keys)
        result.rounds.append(figures)
        progress(f"N={count:,} round {number}: " + json.dumps(summary_of(figures)))
    return result


def remove_posted(store: Path, keys: list[str]) -> None:
    """Delete the accounts a round POSTed, so the next round starts with the same N on disk."""
    for key in keys:
        generate.store_path(store, key).unlink(missing_ok=True)
    (store / ".pending-updates").unlink(missing_ok=True)


def run_round(
    settings: Settings,
    tools: Tools,
    processes: Processes,
    folder: Path,
    store: Path,
    accounts: generate.AccountSet,
    count: int,
    get_keys: list[str],
    sequential: list[tuple[str, bytes]],
    notify: list[tuple[str, bytes]],
) -> dict[str, Any]:
    """Start nasd without NATS and measure start-up, GET, POST and memory. Then measure
    claim update latency with a second nasd connected to a nats-server."""
    figures: dict[str, Any] = {"problems": []}
    config = folder / "nasd.conf"
    config.write_text(nasd_config(store, accounts.operator_jwt, accounts.system_account, None, None))
    nasd, port, figures["startup_s"] = start_nasd(
        processes, tools.twistd, REPOSITORY, config, get_keys[0], settings.startup_timeout
    )
    listed, figures["listed_s"] = wait_for_account_count(nasd, port, settings.startup_timeout)
    if listed != count + 1:
        figures["problems"].append(
            f"nasd's /healthz counted {listed} stored accounts at start-up, expected {count + 1}"
        )

    if tools.wrk:
        measure_get(settings, tools.wrk, processes, folder, port, get_keys, figures)
    measure_posts(settings, tools.wrk, processes, folder, port, accounts, sequential, figures)
    if not nasd.running():
        raise BenchError(f"nasd exited during the load runs with status {nasd.popen.returncode}:\n{nasd.tail()}")
    figures["peak_rss_mib"] = peak_rss_mib(nasd.pid)
    posted = figures["post_sequential_ok"] + figures["post_concurrent_ok"]
    stored_after, _ = wait_for_account_count(nasd, port, 30)
    # wrk does not count the responses still in flight when it stops, so more can be stored.
    if stored_after < count + 1 + posted:
        figures["problems"].append(
            f"after the POST runs /healthz counted {stored_after} accounts, expected at least {count + 1 + posted}"
        )
    stop_nasd(processes, nasd, figures)

    if tools.nats_server and tools.nats_py:
        measure_notification(settings, tools, processes, folder, store, accounts, get_keys[0], notify, figures)
    return figures


def stop_nasd(processes: Processes, nasd: Any, figures: dict[str, Any]) -> None:
    status = processes.stop(nasd)
    if status != 0:
        figures["problems"].append(f"nasd exited with status {status} after SIGTERM (expected 0)")
    for line in log_problems(nasd):
        figures["problems"].append(f"nasd log ({nasd.log_path.name}): {line.strip()[:300]}")


def measure_get(
    settings: Settings,
    wrk: str,
    processes: Processes,
    folder: Path,
    port: int,
    keys: list[str],
    figures: dict[str, Any],
) -> None:
    result = load.run_wrk(
        processes,
        wrk,
        folder,
        "get",
        load.get_script(keys),
        port,
        settings.wrk_threads,
        settings.get_connections,
        settings.get_seconds,
    )
    figures["get_rate"] = result.requests_per_second
    figures["get_p50_ms"] = result.latency_ms.get(50)
    figures["get_p99_ms"] = result.latency_ms.get(99)
    figures["get_requests"] = result.requests
    figures["get_non_2xx_3xx"] = result.non_2xx_3xx
    figures["get_socket_errors"] = sum(result.socket_errors.values())
    if result.non_2xx_3xx:
        figures["problems"].append(f"GET: {result.non_2xx_3xx} responses were not 2xx or 3xx")
    if figures["get_socket_errors"]:
        figures["problems"].append(f"GET: wrk socket errors {result.socket_errors}")


def measure_posts(
    settings: Settings,
    wrk: str | None,
    processes: Processes,
    folder: Path,
    port: int,
    accounts: generate.AccountSet,
    sequential: list[tuple[str, bytes]],
    figures: dict[str, Any],
) -> None:
    one_client = load.post_sequentially(port, sequential, settings.sequential_seconds)
    figures["post_sequential_rate"] = one_client.rate
    figures["post_sequential_ok"] = one_client.ok
    figures["post_sequential_failed"] = one_client.failed
    if one_client.failed:
        figures["problems"].append(f"sequential POST: {one_client.failed} failed; first: {one_client.first_failure}")

    if wrk:
        result = load.run_wrk(
            processes,
            wrk,
            folder,
            "post",
            load.post_script(accounts.concurrent, settings.wrk_threads),
            port,
            settings.wrk_threads,
            settings.concurrent_clients,
            settings.concurrent_seconds,
        )
        summary = result.script_summary
        figures["post_concurrent_client"] = "wrk"
        figures["post_concurrent_rate"] = summary.get("ok", 0) / result.seconds if result.seconds else 0.0
        figures["post_concurrent_ok"] = summary.get("ok", 0)
        figures["post_concurrent_failed"] = summary.get("failed", 0) + sum(result.socket_errors.values())
        if summary.get("exhausted_threads"):
            figures["problems"].append(
                f"concurrent POST: the {settings.concurrent_pool:,} prepared accounts ran out before "
                f"{settings.concurrent_seconds:.0f} s. wrk divides by the whole duration anyway, so the rate "
                "is too low; raise --concurrent-pool"
            )
        if summary.get("failed"):
            figures["problems"].append(
                f"concurrent POST: {summary['failed']} responses were not 200; first: {summary.get('first_failure')}"
            )
        if sum(result.socket_errors.values()):
            figures["problems"].append(f"concurrent POST: wrk socket errors {result.socket_errors}")
    else:
        pool = generate.read_accounts(accounts.concurrent)
        clients = load.post_concurrently(port, pool, settings.concurrent_clients, settings.concurrent_seconds)
        figures["post_concurrent_client"] = "python"
        figures["post_concurrent_rate"] = clients.rate
        figures["post_concurrent_ok"] = clients.ok
        figures["post_concurrent_failed"] = clients.failed
        if clients.failed:
            figures["problems"].append(f"concurrent POST: {clients.failed} failed; first: {clients.first_failure}")


def measure_notification(
    settings: Settings,
    tools: Tools,
    processes: Processes,
    folder: Path,
    store: Path,
    accounts: generate.AccountSet,
    probe_key: str,
    notify: list[tuple[str, bytes]],
    figures: dict[str, Any],
) -> None:
    """Run a nasd connected to a real nats-server and time POST to claim update message."""
    assert tools.nats_server is not None
    nats_port = free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    config = folder / "nasd-nats.conf"
    config.write_text(nasd_config(store, accounts.operator_jwt, accounts.system_account, nats_url, accounts.creds))
    nasd, port, _ = start_nasd(processes, tools.twistd, REPOSITORY, config, probe_key, settings.startup_timeout)
    nats_server = start_nats_server(
        processes, tools.nats_server, folder, nats_port, accounts.operator_jwt, accounts.system_account, port
    )
    subscriber = load.ClaimUpdateSubscriber(nats_url, accounts.creds)
    try:
        wait_for_nats_connection(nasd, port, timeout=30)
        subscriber.start()
        result = load.measure_notifications(port, notify, subscriber, wait_seconds=10)
    finally:
        subscriber.stop()
        stop_nasd(processes, nasd, figures)
        processes.stop(nats_server)
    journal = store / ".pending-updates"
    if journal.exists():
        pending = len(journal.read_text().split())
        figures["problems"].append(f"nasd stopped while connected to NATS but left {pending} keys in {journal.name}")

    figures["notify_posted"] = result.posted
    figures["notify_missing"] = result.missing
    figures["notify_post_failed"] = result.post_failures.failed
    if result.after_response_ms:
        figures["notify_p50_ms"] = load.percentile(result.after_response_ms, 50)
        figures["notify_p99_ms"] = load.percentile(result.after_response_ms, 99)
        figures["notify_request_p99_ms"] = load.percentile(result.after_request_ms, 99)
        figures["notify_before_response"] = sum(1 for delay in result.after_response_ms if delay < 0)
    if result.missing:
        figures["problems"].append(f"notification: {result.missing} of {result.posted} claim updates never arrived")
    if result.post_failures.failed:
        figures["problems"].append(
            f"notification: {result.post_failures.failed} POSTs failed; first: {result.post_failures.first_failure}"
        )


def summary_of(figures: dict[str, Any]) -> dict[str, Any]:
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in figures.items()}


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    settings = settings_from(arguments)
    started = datetime.now(UTC)
    first_commit = git_commit(REPOSITORY)
    processes = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="nasd-bench-"))
    cache = arguments.cache.resolve() if arguments.cache else workdir / "cache"

    def stop_on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    keep = arguments.keep
    try:
        tools = find_tools(arguments)
        if not tools.wrk:
            progress("wrk was not found: the GET figures are skipped. Install it with `apt-get install wrk`.")
        results = [bench_count(settings, tools, processes, workdir, cache, count) for count in settings.counts]
        report = render_report(settings, tools, results, started, (first_commit, git_commit(REPOSITORY)))
    except KeyboardInterrupt:
        progress("interrupted; stopping the processes the benchmark started")
        return 130
    except BenchError as error:
        progress(f"benchmark failed: {error}")
        keep = True
        return 1
    finally:
        processes.stop_all()
        if keep:
            progress(f"kept {workdir} (logs, configurations and stores)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(report, end="")
    if arguments.out:
        arguments.out.write_text(report)
        progress(f"wrote {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
