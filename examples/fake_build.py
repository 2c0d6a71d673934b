"""A stand-in build step for trying matrixjobs: prints progress lines while it "works".

Usage: fake_build.py [--steps N] [--delay SECONDS] [--fail-at STEP] [NAME]
"""

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", nargs="?", default="project")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--fail-at", type=int, default=0)
    args = parser.parse_args()
    print(f"building {args.name} in {args.steps} steps")
    for step in range(1, args.steps + 1):
        time.sleep(args.delay)
        if step == args.fail_at:
            print(f"error: step {step} of {args.name} failed", file=sys.stderr)
            return 1
        print(f"::progress {step}/{args.steps} compiling part {step} of {args.name}", flush=True)
    print(f"{args.name} built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
