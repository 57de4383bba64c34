"""scripts/fetch-evaldata.sh, run against a local mirror laid out like raw.githubusercontent.com (this machine
cannot reach GitHub): it must rebuild the evaluation folder byte for byte and refuse a damaged file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import EVALDATA, REPO

SCRIPT = REPO / "scripts" / "fetch-evaldata.sh"
pytestmark = pytest.mark.skipif(
    not (EVALDATA / "arc_easy" / "ARC-Easy-Test.jsonl").is_file(),
    reason="needs a local copy of the evaluation files (PTQ_EVALDATA) to build the mirror from",
)


def script_sources() -> dict:
    """Folder in the mirror -> (owner/repo/commit/path prefix), read from the script itself."""
    text = SCRIPT.read_text()
    return {
        key: text.split(f'{key}="', 1)[1].split('"', 1)[0]
        for key in ("WIKITEXT_RAW", "WIKITEXT", "HELLASWAG", "MMLU", "SHAKESPEARE", "ARC")
    }


def build_mirror(root: Path) -> None:
    src = script_sources()

    def put(prefix: str, relative: str, source: Path) -> None:
        target = root / prefix / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    put(src["WIKITEXT_RAW"], "wiki.test.raw", EVALDATA / "wikitext2_raw" / "wiki.test.raw")
    for name in ("test.txt", "valid.txt"):
        put(src["WIKITEXT"], name, EVALDATA / "wikitext2" / name)
    put(src["SHAKESPEARE"], "input.txt", EVALDATA / "tinyshakespeare" / "input.txt")
    put(src["HELLASWAG"], "hellaswag_val_full.txt.bz2", EVALDATA / "hellaswag" / "hellaswag_val_full.txt.bz2")
    for csv in sorted((EVALDATA / "mmlu").rglob("*.csv")):
        put(src["MMLU"], str(csv.relative_to(EVALDATA / "mmlu")), csv)
    # The official ARC layout, rebuilt from the projected copy (the evidence paragraphs are not kept there).
    official = root / src["ARC"] / "test.jsonl"
    official.parent.mkdir(parents=True, exist_ok=True)
    with (EVALDATA / "arc_easy" / "ARC-Easy-Test.jsonl").open() as rows, official.open("w") as out:
        for line in rows:
            item = json.loads(line)
            choices = [
                {"text": t, "label": label, "para": "evidence"}
                for t, label in zip(item["choices"]["text"], item["choices"]["label"])
            ]
            out.write(
                json.dumps(
                    {
                        "id": item["id"],
                        "question": {"stem": item["question"], "choices": choices},
                        "answerKey": item["answerKey"],
                    }
                )
                + "\n"
            )


def fetch(mirror: Path, dest: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PTQ_EVALDATA_MIRROR": f"file://{mirror}"}
    return subprocess.run(["bash", str(SCRIPT), str(dest)], env=env, capture_output=True, text=True, timeout=300)


def test_the_fetch_rebuilds_every_file_and_checks_it(tmp_path):
    build_mirror(tmp_path / "mirror")
    done = fetch(tmp_path / "mirror", tmp_path / "data")
    assert done.returncode == 0, done.stderr
    listed = [line.split(None, 1)[1] for line in (REPO / "scripts" / "evaldata.sha256").read_text().splitlines()]
    for name in listed:
        assert (tmp_path / "data" / name).read_bytes() == (EVALDATA / name).read_bytes(), name
    assert not list((tmp_path / "data").rglob("*.part"))
    again = fetch(tmp_path / "mirror", tmp_path / "data")  # nothing missing: nothing fetched, still checked
    assert again.returncode == 0 and " ok" not in again.stdout


def test_a_damaged_download_is_refused_and_not_kept(tmp_path):
    build_mirror(tmp_path / "mirror")
    damaged = tmp_path / "mirror" / script_sources()["WIKITEXT"] / "valid.txt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    done = fetch(tmp_path / "mirror", tmp_path / "data")
    assert done.returncode != 0
    assert "wikitext2/valid.txt has sha256" in done.stderr and "expected" in done.stderr
    assert not (tmp_path / "data" / "wikitext2" / "valid.txt").exists()
    assert not (tmp_path / "data" / "wikitext2" / "valid.txt.part").exists()
