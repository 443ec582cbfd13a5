"""Create Genesis's work pools if they do not exist: `python deployments/bootstrap.py [--pool NAME]`.

`prefect deploy --all` needs the pool named in prefect.yaml to exist; this makes a fresh server ready.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def ensure_pool(name: str, pool_type: str = "process") -> bool:
    """True when the pool was created, False when it already existed."""
    exists = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "inspect", name], capture_output=True)
    if exists.returncode == 0:
        return False
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", name, "--type", pool_type], check=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pool", default="genesis-process")
    args = parser.parse_args()
    print(f"work pool {args.pool}: {'created' if ensure_pool(args.pool) else 'exists'}")


if __name__ == "__main__":
    main()
