"""Print the packages whose installed version differs from the lock (``make test-latest``).

Usage: ``python requirements/compare.py LOCK FREEZE`` where FREEZE is ``pip freeze`` output.
"""

from __future__ import annotations

import re
import sys

from packaging.utils import canonicalize_name

_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)")


def pins(path: str) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line in a requirements file."""
    found: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            match = _PIN.match(line.strip())
            if match:
                found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def main(lock_path: str, freeze_path: str) -> int:
    locked, installed = pins(lock_path), pins(freeze_path)
    rows = [
        f"  {name}: {locked.get(name, '-')} -> {version}"
        for name, version in sorted(installed.items())
        if locked.get(name) != version
    ]
    print("\n".join(rows) if rows else "  (nothing: the lock is current)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
