"""Run one engine in its own process so a test can measure that process's RSS.

Usage: python engine_host.py '<json spec>'   spec: {"impl", "tuning": {...}, "routes": [{...}]}
Prints one JSON line {"bound": {route_id: address}}; then answers stdin lines:
``stats`` -> RouteStats of every route as JSON, ``counts`` -> ResourceCounts, ``quit`` -> exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from scistream.dataplane import Engine, Route, Tuning


def main() -> int:
    spec = json.loads(sys.argv[1])
    engine = Engine(Tuning(**spec.get("tuning", {})), impl=spec["impl"])
    try:
        bound = {}
        for r in spec["routes"]:
            info = engine.add_route(Route(**r))
            bound[r["route_id"]] = info.bound
        sys.stdout.write(json.dumps({"bound": bound}) + "\n")
        sys.stdout.flush()
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            if cmd == "stats":
                out = {k: dataclasses.asdict(v) for k, v in engine.stats().routes.items()}
            elif cmd == "counts":
                out = dataclasses.asdict(engine.resource_counts())
            else:
                out = {"error": f"unknown command {cmd!r}"}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
