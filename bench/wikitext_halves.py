"""Split WikiText-2's test file into the two halves the GPU benchmarks use.

    python -m bench.wikitext_halves WIKI_TEST_RAW OUT_DIR

Writes OUT_DIR/fidelity.txt (the first half of the lines: held-out text for fidelity) and OUT_DIR/calib.txt
(the second half: calibration text), so calibration and fidelity never share a token.
"""

from __future__ import annotations

import sys
from pathlib import Path


def split(source: str, out_dir: str) -> None:
    lines = Path(source).read_text(encoding="utf-8").splitlines(keepends=True)
    half = len(lines) // 2
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.txt").write_text("".join(lines[:half]), encoding="utf-8")
    (out / "calib.txt").write_text("".join(lines[half:]), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    split(sys.argv[1], sys.argv[2])
