"""Turn bench/results/*.json into a markdown report and PNG charts.

    python bench/report.py [RESULTS_DIR]

Medians over rounds; ratios against the direct run and against the best peer of
the same kind (1 hop / TLS pair) from the same benchmark run only.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

OURS = ("scistream-native", "scistream-pure", "scistream-native-tls", "scistream-pure-tls",
        "scistream-native-tls-baseline")
KIND = {
    "direct": "direct",
    "scistream-native": "1 hop",
    "scistream-pure": "1 hop",
    "haproxy-splice": "1 hop",
    "nginx": "1 hop",
    "socat": "1 hop",
    "scistream-native-tls": "TLS pair",
    "scistream-native-tls-baseline": "TLS pair",  # BENCH_BASELINE: another build, same run
    "scistream-pure-tls": "TLS pair",
    "stunnel-tls13": "TLS pair",
    "stunnel-1x": "TLS pair",
    "haproxy-tls": "TLS pair",
}


def _median(values: list[float]) -> float | None:
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
    out = results / "REPORT.md"
    out.write_text("\n".join(parts))
    written.append(out)
    return written


if __name__ == "__main__":
    for p in render(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"):
        print(p)
