"""``python -m bench [--quick | --tiny] [--out DIR]`` — see `bench` for what it measures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.harness import PLANS, run_bench
from bench.report import markdown, print_report, ratios, targets, write_chart, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller and shorter (< 1 min)")
    mode.add_argument("--tiny", action="store_true", help="a handful of clients (for tests)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="results folder"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated workloads and/or competitors to run, e.g. W3 or W2,pgbroker",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the broker under W1 and W2 instead"
    )
    parser.add_argument(
        "--no-pgbroker", action="store_true", help="benchmark only PgBouncer and direct"
    )
    args = parser.parse_args(argv)
    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.profile:
        from bench.profile import print_profile, run_profile

        profile = run_profile(PLANS[name], args.out)
        write_json(profile, args.out / "profile.json")
        print_profile(profile)
        return 0
    try:
        only = {part.strip() for part in args.only.split(",") if part.strip()}
        data = run_bench(PLANS[name], with_pgbroker=not args.no_pgbroker, only=only)
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    data["ratios"] = ratios(data["results"])
    data["targets"] = targets(data)
    stem = "latest" if name == "full" else name
    write_json(data, args.out / f"{stem}.json")
    write_chart(data, args.out / f"{stem}.png")
    (args.out / f"{stem}.md").write_text(markdown(data))
    print_report(data)
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
