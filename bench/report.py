"""Turn bench/results/*.json into a markdown report and PNG charts.

    python bench/report.py [RESULTS_DIR]

Medians over rounds; ratios against the direct run and against the best peer of
the same kind (1 hop / TLS pair) from the same benchmark run only.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

OURS = ("scistream-native", "scistream-pure", "scistream-native-tls", "scistream-pure-tls",
        "scistream-native-tls-baseline", "scistream-native-tls-openssl-gcm")
KIND = {
    "direct": "direct",
    "scistream-native": "1 hop",
    "scistream-pure": "1 hop",
    "haproxy-splice": "1 hop",
    "nginx": "1 hop",
    "socat": "1 hop",
    "scistream-native-tls": "TLS pair",
    "scistream-native-tls-baseline": "TLS pair",  # BENCH_BASELINE: another build, same run
    "scistream-native-tls-openssl-gcm": "TLS pair",  # AES-GCM by OpenSSL, as the peers have it
    "scistream-pure-tls": "TLS pair",
    "stunnel-tls13": "TLS pair",
    "stunnel-1x": "TLS pair",
    "haproxy-tls": "TLS pair",
}


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ordered(configs: set[str]) -> list[str]:
    return sorted(configs, key=lambda c: list(KIND).index(c) if c in KIND else 99)


def _best_peer(med: dict[Any, dict[str, Any]], config: str, key: Any, metric: str) -> float | None:
    """The best ``metric`` among the peers (not ours) of ``config``'s kind at ``key``."""
    kind = KIND.get(config, "")
    return max(
        (
            med[(c, key)][metric]
            for c in KIND
            if KIND[c] == kind and c not in OURS and c != config and (c, key) in med and med[(c, key)][metric]
        ),
        default=None,
    )


def _forwarder_medians(data: dict[str, Any], *, paced: bool) -> dict[tuple[str, Any], dict[str, Any]]:
    """Medians over rounds of the unpaced runs per (config, streams), or of the paced runs
    per (config, offered load)."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for row in data["rows"]:
        load = row.get("load_gbps")
        if bool(load) == paced:
            groups[(row["config"], load if paced else row["streams"])].append(row)
    return {
        key: {
            "gbps": _median([r["gbps"] for r in rows]),
            "cpu_cores": _median([r["forwarder_cpu_s"] / r["seconds"] for r in rows]),
            "per_cpu": _median([r["gbit_per_cpu_s"] for r in rows]),
            "n": len(rows),
        }
        for key, rows in groups.items()
    }


def throughput_table(data: dict[str, Any]) -> tuple[str, dict[tuple[str, int], dict[str, Any]]]:
    """Medians per (config, streams) of the unpaced runs, with ratios to direct and the best peer."""
    med = _forwarder_medians(data, paced=False)
    lines = [
        "| path | streams | Gbit/s | x direct | forwarder cores | Gbit per CPU-s | CPU-s per GB per side | "
        "x best peer (Gbit/s) | x best peer (per CPU-s) | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for streams in sorted({k[1] for k in med}):
        direct = med.get(("direct", streams), {}).get("gbps")
        for config in _ordered({k[0] for k in med if k[1] == streams}):
            m = med[(config, streams)]
            kind = KIND.get(config, "")
            best_gbps = _best_peer(med, config, streams, "gbps")
            best_per = _best_peer(med, config, streams, "per_cpu")
            vs = config in OURS
            lines.append(
                f"| {config} ({kind}) | {streams} | {_fmt(m['gbps'])} | "
                f"{_fmt(m['gbps'] / direct if direct and m['gbps'] else None, 2)} | "
                f"{_fmt(m['cpu_cores'], 2)} | {_fmt(m['per_cpu'])} | "
                f"{_fmt(cpu_per_gb_side(config, m['per_cpu']), 3)} | "
                f"{_fmt(m['gbps'] / best_gbps if vs and best_gbps and m['gbps'] else None, 2)} | "
                f"{_fmt(m['per_cpu'] / best_per if vs and best_per and m['per_cpu'] else None, 2)} | "
                f"{m['n']} |"
            )
    return "\n".join(lines), med


def cpu_per_gb_side(config: str, per_cpu: float | None) -> float | None:
    """CPU-seconds per GB moved, per forwarder process (a pair has two: one per gateway)."""
    if not per_cpu:
        return None
    return 8 / per_cpu / (2 if KIND.get(config) == "TLS pair" else 1)


def load_table(data: dict[str, Any]) -> str | None:
    """Medians per (config, offered load) of the paced runs: the CPU each forwarder
    spends on the same bytes at the same rate, with the ratio to the best peer."""
    med = _forwarder_medians(data, paced=True)
    if not med:
        return None
    lines = [
        "| path | offered Gbit/s | delivered Gbit/s | forwarder cores | Gbit per CPU-s | "
        "CPU-s per GB per side | x best peer (per CPU-s) | rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for load in sorted({k[1] for k in med}):
        for config in _ordered({k[0] for k in med if k[1] == load}):
            m = med[(config, load)]
            best = _best_peer(med, config, load, "per_cpu") if config in OURS else None
            lines.append(
                f"| {config} ({KIND.get(config, '')}) | {load:g} | {_fmt(m['gbps'])} | "
                f"{_fmt(m['cpu_cores'], 2)} | {_fmt(m['per_cpu'])} | "
                f"{_fmt(cpu_per_gb_side(config, m['per_cpu']), 3)} | "
                f"{_fmt(m['per_cpu'] / best if best and m['per_cpu'] else None, 2)} | {m['n']} |"
            )
    return "\n".join(lines)


def throughput_chart(med: dict[tuple[str, int], dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    streams = sorted({k[1] for k in med})
    configs = [c for c in KIND if any((c, s) in med for s in streams)]
    configs += sorted({k[0] for k in med} - set(configs))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(configs) + 2))
    height = 0.8 / max(1, len(streams))
    for ax, metric, title in (
        (axes[0], "gbps", "Gbit/s (median)"),
        (axes[1], "per_cpu", "Gbit per forwarder CPU-second"),
    ):
        for i, s in enumerate(streams):
            ys = [j + i * height for j in range(len(configs))]
            vals = [med.get((c, s), {}).get(metric) or 0 for c in configs]
            colors = [
                "tab:green" if c in OURS else "tab:gray" if c == "direct" else "tab:blue" for c in configs
            ]
            ax.barh(
                ys,
                vals,
                height=height,
                color=colors,
                alpha=1.0 if i == 0 else 0.55,
                label=f"{s} stream{'s' if s > 1 else ''}",
            )
        ax.set_yticks([j + height * (len(streams) - 1) / 2 for j in range(len(configs))])
        ax.set_yticklabels(configs)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.legend(loc="lower right")
    fig.suptitle("Forwarders on loopback in a private namespace (reno), iperf3")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_table(data: dict[str, Any]) -> str:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in data["rows"]:
        groups[row["name"]].append(row)
    lines = ["| what | median | p90 | p99 | n | note |", "|---|---|---|---|---|---|"]
    for name, rows in groups.items():
        vals = sorted(v for r in rows for v in r["values"])
        unit = rows[0]["unit"]
        p90 = vals[min(len(vals) - 1, int(0.9 * len(vals)))] if vals else None
        p99 = vals[min(len(vals) - 1, int(0.99 * len(vals)))] if vals else None
        lines.append(
            f"| {name} | {_fmt(_median(vals), 3)} {unit} | {_fmt(p90, 3)} {unit} | "
            f"{_fmt(p99, 3)} {unit} | {len(vals)} | {rows[0].get('note', '')} |"
        )
    return "\n".join(lines)


def chain_table(data: dict[str, Any]) -> str:
    """Medians per (config, streams) of the two-gateway chain, with ratios to "direct"."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in data["rows"]:
        groups[(row["config"], row["streams"])].append(row)
    lines = [
        "| chain | streams | Gbit/s | x direct | gateway CPU-s per GB | set-up s | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    order = ["direct", "native-tls", "native-plain", "stunnel-tls", "stunnel-compat", "haproxy-plain"]
    for streams in sorted({k[1] for k in groups}):
        direct = _median([r["gbps"] for r in groups.get(("direct", streams), [])])
        for config in sorted(
            {k[0] for k in groups if k[1] == streams}, key=lambda c: order.index(c) if c in order else 99
        ):
            rows = groups[(config, streams)]
            gbps = _median([r["gbps"] for r in rows])
            lines.append(
                f"| {config} | {streams} | {_fmt(gbps)} | "
                f"{_fmt(gbps / direct if direct and gbps else None, 2)} | "
                f"{_fmt(_median([r['cpu_s_per_gb'] for r in rows]), 3)} | "
                f"{_fmt(_median([r['setup_s'] for r in rows]), 2)} | {len(rows)} |"
            )
    return "\n".join(lines)


def _per_round_ratio(rows: list[dict[str, Any]], ref: list[dict[str, Any]], metric: Any) -> str:
    """Median (and range) of ``metric(row) / metric(reference row of the same round)``."""
    by_round = {r["round"]: metric(r) for r in ref}
    ratios = [metric(r) / by_round[r["round"]] for r in rows if metric(r) and by_round.get(r["round"])]
    if not ratios:
        return "-"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def _pct(values: list[float], q: float) -> float | None:
    vals = sorted(values)
    return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else None


def cluster_setup_table(data: dict[str, Any]) -> str:
    """Issue 12's control plane: per configuration the medians over rounds of each round's
    p50/p99, and ratios to the single node (SQLite) of the same round."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in data["rows"]:
        groups[row["config"]].append(row)
    ref = groups.get("sqlite-1", [])
    lines = [
        "| gateway | set-up p50 | set-up p99 | x 1 node (SQLite), p50 | cross-node set-up p50 / p99 | "
        "release p50 / p99 | sessions/s | x 1 node (SQLite), sessions/s | cycle p50 / p99 under load | "
        "gateway CPU ms per session | etcd CPU ms per session | etcd writes per session | "
        "other jobs' cores | failed | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def med(rows: list[dict[str, Any]], key: str, q: float | None = None) -> float | None:
        return _median([(_pct(r[key], q) if q is not None else r[key]) for r in rows])

    def others(r: dict[str, Any]) -> float | None:
        """Cores other jobs on the shared machine took meanwhile (all busy time less ours)."""
        if "machine_busy_s" not in r:
            return None
        ours = sum(r["cpu_s"].values()) + r["client_cpu_s"]
        return max(0.0, r["machine_busy_s"] - ours) / r["elapsed_s"]

    def p50(key: str) -> Any:
        return lambda r: _pct(r[key], 0.5)

    for config in sorted(groups, key=lambda c: (c != "sqlite-1", c)):
        rows = groups[config]
        cross = any(r["cross_setup_ms"] for r in rows)
        is_ref = config == "sqlite-1"
        x_p50 = "1.00x" if is_ref else _per_round_ratio(rows, ref, p50("setup_ms"))
        x_rate = "1.00x" if is_ref else _per_round_ratio(rows, ref, lambda r: r["sessions_per_s"])
        lines.append(
            f"| {config} ({rows[0]['nodes']} node{'s' if rows[0]['nodes'] > 1 else ''}, "
            f"{rows[0]['num_conn']} conn) | "
            f"{_fmt(med(rows, 'setup_ms', 0.5))} ms | {_fmt(med(rows, 'setup_ms', 0.99))} ms | "
            f"{x_p50} | "
            + (
                f"{_fmt(med(rows, 'cross_setup_ms', 0.5))} / {_fmt(med(rows, 'cross_setup_ms', 0.99))} ms | "
                if cross
                else "- | "
            )
            + f"{_fmt(med(rows, 'release_ms', 0.5))} / {_fmt(med(rows, 'release_ms', 0.99))} ms | "
            f"{_fmt(med(rows, 'sessions_per_s'))} ({rows[0]['clients']} clients) | "
            f"{x_rate} | "
            f"{_fmt(med(rows, 'cycle_ms', 0.5))} / {_fmt(med(rows, 'cycle_ms', 0.99))} ms | "
            f"{_fmt(med(rows, 'gateway_cpu_ms_per_session'))} | "
            f"{_fmt(med(rows, 'etcd_cpu_ms_per_session'))} | "
            f"{_fmt(_median([r.get('etcd_writes_per_session') for r in rows]))} | "
            f"{_fmt(_median([others(r) for r in rows]), 2)} | "
            f"{sum(r['failed'] for r in rows)} | {len(rows)} |"
        )
    return "\n".join(lines)


def cluster_stream_table(data: dict[str, Any]) -> str:
    """Issue 12's data plane: one session over 1..N nodes; medians over rounds, ratios to
    the single node of the same round."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in data["rows"]:
        groups[row["config"]].append(row)
    lines = [
        "| producer gateway | num_conn | connections per node | Gbit/s | x 1 node (SQLite) | "
        "x 1 node (etcd) | gateway CPU-s per GB | producer s2ds cores (all nodes) | consumer s2ds cores | "
        "s2cs + etcd cores | load CPU-s per GB | our cores (of 2) | other jobs' cores | "
        "bytes verified | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cores(r: dict[str, Any], pick: Any) -> float | None:
        used = sum(v for k, v in r["cpu_s"].items() if pick(k))
        return used / r["window_s"] if r["window_s"] else None

    def all_cores(r: dict[str, Any]) -> float | None:
        """Every measured process: gateways, etcd and the load (producer + consumer)."""
        used = sum(r["cpu_s"].values()) + r.get("load_cpu_s", 0.0)
        return used / r["window_s"] if r["window_s"] else None

    def others(r: dict[str, Any]) -> float | None:
        """Cores other jobs on the shared machine took over the window (all busy time less ours)."""
        ours = all_cores(r)
        if "machine_busy_s" not in r or not r["window_s"] or ours is None:
            return None
        return max(0.0, r["machine_busy_s"] / r["window_s"] - ours)

    for config in sorted(groups, key=lambda c: (c != "sqlite-1", c)):
        rows = groups[config]
        per_node = Counter(rows[0]["listener_nodes"]) if rows[0]["listener_nodes"] else {}
        spread = ", ".join(f"{n}: {k}" for n, k in sorted(per_node.items())) or f"one: {rows[0]['num_conn']}"
        gbps = [r["gbps"] for r in rows if r["verified"]]
        lines.append(
            f"| {config} | {rows[0]['num_conn']} | {spread} | {_fmt(_median(gbps))} | "
            f"{_per_round_ratio(rows, groups.get('sqlite-1', []), lambda r: r['gbps'])} | "
            f"{_per_round_ratio(rows, groups.get('etcd-1', []), lambda r: r['gbps'])} | "
            f"{_fmt(_median([r['gateway_cpu_s_per_gb'] for r in rows]), 3)} | "
            f"{_fmt(_median([cores(r, lambda k: k.startswith('s2ds:')) for r in rows]), 2)} | "
            f"{_fmt(_median([cores(r, lambda k: k.startswith('cons-s2ds')) for r in rows]), 2)} | "
            f"{_fmt(_median([cores(r, lambda k: 's2cs' in k or 'etcd' in k) for r in rows]), 2)} | "
            f"{_fmt(_median([r['load_cpu_s_per_gb'] for r in rows]), 3)} | "
            f"{_fmt(_median([all_cores(r) for r in rows]), 2)} | "
            f"{_fmt(_median([others(r) for r in rows]), 2)} | "
            f"{sum(1 for r in rows if r['verified'])}/{len(rows)} rounds, "
            f"{sum(r['bytes_verified'] for r in rows) / 1e9:.1f} GB | {len(rows)} |"
        )
    return "\n".join(lines)


def render(results: Path) -> list[Path]:
    """Write REPORT.md (and throughput.png) into ``results``; return what was written."""
    written: list[Path] = []
    parts = ["# Benchmark report", ""]
    tp = results / "throughput.json"
    if tp.exists():
        data = json.loads(tp.read_text())
        meta = data["meta"]
        table, med = throughput_table(data)
        parts += [
            f"Run {meta['date']}, iperf3 -t {meta['seconds']:g}, {meta['rounds']} round(s), "
            f"{meta['cpus']} CPUs, kernel {meta['kernel']}.",
            "",
            "## Forwarders",
            "",
            table,
            "",
        ]
        loads = load_table(data)
        if loads:
            parts += [
                "## Forwarders at an equal offered load",
                "",
                "One stream paced by iperf3 -b: every forwarder of a kind carries the same "
                "bytes at the same rate, so CPU compares work for work.",
                "",
                loads,
                "",
            ]
        chart = throughput_chart(med, results / "throughput.png")
        if chart:
            written.append(chart)
            parts += ["![throughput](throughput.png)", ""]
    chain = results / "chain.json"
    if chain.exists():
        data = json.loads(chain.read_text())
        meta = data["meta"]
        parts += [
            "## Two-gateway chain in the tutorial topology",
            "",
            f"Run {meta['date']}, iperf3 -R -t {meta['seconds']:g} from the consumer through "
            f"both gateways, {meta['rounds']} round(s); set-up = `s2uc stream --appctrl` with "
            "both hellos, process start-up included.",
            "",
            chain_table(data),
            "",
        ]
    latency = results / "latency.json"
    if latency.exists():
        parts += ["## Session set-up (control plane)", "", latency_table(json.loads(latency.read_text())), ""]
    cluster = results / "cluster_setup.json"
    if cluster.exists():
        data = json.loads(cluster.read_text())
        parts += [
            "## Multi-node gateway: session set-up (issue 12)",
            "",
            f"Run {data['meta']['date']}, {data['meta']['rounds']} round(s), round robin, fresh processes "
            "per case; medians over rounds of each round's percentile; ratios are medians of "
            "per-round ratios (range in brackets).",
            "",
            cluster_setup_table(data),
            "",
        ]
    stream = results / "cluster_stream.json"
    if stream.exists():
        data = json.loads(stream.read_text())
        parts += [
            "## Multi-node gateway: one session spread over nodes (issue 12)",
            "",
            f"Run {data['meta']['date']}, {data['meta']['seconds']:g} s per case, "
            f"{data['meta']['rounds']} round(s), TLS leg, one private namespace (reno) per case.",
            "",
            cluster_stream_table(data),
            "",
        ]
    notes = results / "NOTES.md"  # hand-written commands and readings kept with a run
    if notes.exists():
        parts += [notes.read_text().rstrip(), ""]
    out = results / "REPORT.md"
    out.write_text("\n".join(parts))
    written.append(out)
    return written


if __name__ == "__main__":
    for p in render(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"):
        print(p)
