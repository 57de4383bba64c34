"""Write image-text pair files (ptq/vlm.py) from pictures that ship inside Python packages, for calibrating and
measuring vision-language models without a download.

    python -m bench.vlm_pairs --out DIR [--calib 64] [--heldout 16]

Sources: matplotlib's sample data (always installed with the launcher) and, where scikit-image is installed, its
bundled sample photographs. Each picture gives several square crops at different places and scales, each crop is
paired with one of a fixed set of instructions, and the crops are split into DIR/calib.jsonl and DIR/heldout.jsonl
with no crop in both. Paths in the files are relative to DIR. The same arguments write the same files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator, List, Tuple

PROMPTS = (
    "Describe this picture in one sentence.",
    "What is the main object in this image?",
    "Which colours dominate this picture?",
    "Is this a photograph or a drawing? Explain briefly.",
    "Write a short caption for this image.",
    "What would you look at first in this picture, and why?",
    "Describe the background of this image.",
    "How many distinct objects can you see here?",
)
# (left, top, size) as shares of the picture's shorter side: the whole centre, four quarters, two bands.
CROPS = (
    (0.0, 0.0, 1.0),
    (0.0, 0.0, 0.5),
    (0.5, 0.0, 0.5),
    (0.0, 0.5, 0.5),
    (0.5, 0.5, 0.5),
    (0.25, 0.25, 0.5),
    (0.1, 0.3, 0.7),
)


def pictures() -> Iterator[Tuple[str, "object"]]:
    """(name, PIL image) of every bundled picture found."""
    import matplotlib
    from PIL import Image

    samples = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        if (samples / name).is_file():
            with Image.open(samples / name) as image:
                yield f"mpl-{Path(name).stem}", image.convert("RGB")
    try:
        from skimage import data
    except ImportError:
        return
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "horse"):
        try:
            array = getattr(data, name)()
        except Exception:  # a sample the installed version does not bundle (some are downloaded on first use)
            continue
        from PIL import Image

        image = Image.fromarray(array if array.dtype.name == "uint8" else (array * 255).astype("uint8"))
        yield f"skimage-{name}", image.convert("RGB")


def crops(image, size: int = 448) -> List:
    width, height = image.size
    side = min(width, height)
    out = []
    for left, top, share in CROPS:
        edge = int(side * share)
        x, y = ((width - edge) // 2, (height - edge) // 2) if share >= 1 else (int(left * side), int(top * side))
        x, y = min(max(0, x), width - edge), min(max(0, y), height - edge)
        out.append(image.crop((x, y, x + edge, y + edge)).resize((size, size)))
    return out


def write(out: Path, calib: int, heldout: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    rows = []
    for name, image in pictures():
        for i, crop in enumerate(crops(image)):
            path = Path("images") / f"{name}-{i}.png"
            crop.save(out / path)
            rows.append({"image": str(path), "text": PROMPTS[len(rows) % len(PROMPTS)]})
    # Every fifth crop is held out (up to `heldout`), so both files see every picture.
    held = [r for i, r in enumerate(rows) if i % 5 == 4][:heldout]
    rest = [r for r in rows if r not in held]
    if len(rest) < calib or len(held) < heldout:
        raise SystemExit(
            f"only {len(rows)} crops were made ({len(rest)} for calibration, {len(held)} held out); ask for fewer, "
            "or install scikit-image for more pictures"
        )
    for file, chosen in (("calib.jsonl", rest[:calib]), ("heldout.jsonl", held)):
        (out / file).write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return {"crops": len(rows), "calib": calib, "heldout": len(held)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(write(Path(args.out), args.calib, args.heldout)))


if __name__ == "__main__":
    main()
