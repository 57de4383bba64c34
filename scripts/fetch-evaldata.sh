#!/usr/bin/env bash
# Fetch the local evaluation files that eval=local_quick and eval=local_full read, on a machine with internet
# access, and check every file against scripts/evaldata.sha256. Copy the folder to machines without internet.
#
#     bash scripts/fetch-evaldata.sh DEST
#     export PTQ_EVALDATA=DEST          # or pass eval.data_dir=DEST
#
# Each file comes from a fixed commit of a public GitHub repository (docs/results.md
# names them and their licences). Files are downloaded under a temporary name and appear under their own
# name only once their checksum matches, so an interrupted or damaged download never looks complete.
# Running it again fetches only what is missing. PTQ_EVALDATA_MIRROR replaces https://raw.githubusercontent.com
# (a local mirror with the same <owner>/<repo>/<commit>/<path> layout; file:// works).
set -euo pipefail
[ $# -eq 1 ] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
DEST=$1
SUMS="$(cd "$(dirname "$0")" && pwd)/evaldata.sha256"
BASE=${PTQ_EVALDATA_MIRROR:-https://raw.githubusercontent.com}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

WIKITEXT_RAW="Tylogi/TyloQuant/7989d038b13ca737da11a95fb90e77ae059f33c0/data/wikitext-2-raw"
WIKITEXT="DiMarzioBian/Neural-Probabilistic-Language-Model-NIPS-2000/522b6ae78c58fe27e95ea18cc99704ddbaab030b/data/wikitext-2"
HELLASWAG="klosax/hellaswag_text_data/1105d370f8340eac3c63a91fd1fa58e8999f9505"
MMLU="HaeChan0305/MLILAB-FedLLM/d92730e8bacd7b3a61e551e015e40588e10234b4/data/mmlu"
SHAKESPEARE="karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare"
ARC="nju-websoft/GenMC/eada4b06cf25bd95333422e1a1c02d4db3d25945/data/arc_easy/official"

want() { awk -v f="$1" '$2 == f { print $1 }' "$SUMS"; }

# place NAME: check $DEST/NAME.part against the checksum list, then give it its name.
place() {
    local name=$1 have expected
    expected=$(want "$name")
    [ -n "$expected" ] || { echo "fetch-evaldata: $name is not in $SUMS" >&2; exit 1; }
    have=$(sha256sum "$DEST/$name.part" | cut -d' ' -f1)
    if [ "$have" != "$expected" ]; then
        rm -f "$DEST/$name.part"
        echo "fetch-evaldata: $name has sha256 $have, expected $expected: the download is damaged or the" \
             "source changed; nothing was kept under that name. Run the script again, or check the source." >&2
        exit 1
    fi
    mv "$DEST/$name.part" "$DEST/$name"
    echo "fetch-evaldata: $name ok"
}

# get NAME URL_PATH: download to NAME.part and place it, unless NAME is already there and checks out.
get() {
    local name=$1 url="$BASE/$2"
    if [ -f "$DEST/$name" ] && [ "$(sha256sum "$DEST/$name" | cut -d' ' -f1)" = "$(want "$name")" ]; then
        return
    fi
    mkdir -p "$(dirname "$DEST/$name")"
    curl -fsSL --retry 3 -o "$DEST/$name.part" "$url" || { rm -f "$DEST/$name.part"; echo "fetch-evaldata: cannot download $url" >&2; exit 1; }
    place "$name"
}

get wikitext2_raw/wiki.test.raw "$WIKITEXT_RAW/wiki.test.raw"
get wikitext2/test.txt "$WIKITEXT/test.txt"
get wikitext2/valid.txt "$WIKITEXT/valid.txt"
get tinyshakespeare/input.txt "$SHAKESPEARE/input.txt"
get hellaswag/hellaswag_val_full.txt.bz2 "$HELLASWAG/hellaswag_val_full.txt.bz2"
for name in $(awk '$2 ~ /^mmlu\// { print $2 }' "$SUMS"); do
    get "$name" "$MMLU/${name#mmlu/}"
done

# The first 1,000 HellaSwag items (6 lines each), cut from the full file.
if [ ! -f "$DEST/hellaswag/hellaswag_val_first1000.txt" ]; then
    # head stops reading early, which ends bzcat with SIGPIPE: expected here, and the checksum checks the result.
    (set +o pipefail; bzcat "$DEST/hellaswag/hellaswag_val_full.txt.bz2" | head -n 6000 > "$DEST/hellaswag/hellaswag_val_first1000.txt.part")
    place hellaswag/hellaswag_val_first1000.txt
fi

# ARC-Easy: the official test file, with its questions and choices rewritten in the layout lm-eval's ai2_arc
# uses ({"id", "question", "choices": {"text", "label"}, "answerKey"}) and the retrieved evidence dropped.
if [ ! -f "$DEST/arc_easy/ARC-Easy-Test.jsonl" ]; then
    mkdir -p "$DEST/arc_easy"
    curl -fsSL --retry 3 -o "$DEST/arc_easy/official-test.jsonl.part" "$BASE/$ARC/test.jsonl" \
        || { rm -f "$DEST/arc_easy/official-test.jsonl.part"; echo "fetch-evaldata: cannot download $BASE/$ARC/test.jsonl" >&2; exit 1; }
    python3 - "$DEST/arc_easy/official-test.jsonl.part" "$DEST/arc_easy/ARC-Easy-Test.jsonl.part" <<'PY'
import json
import sys

source, target = sys.argv[1], sys.argv[2]
with open(source, encoding="utf-8") as rows, open(target, "w", encoding="utf-8") as out:
    for line in rows:
        if not line.strip():
            continue
        item = json.loads(line)
        choices = item["question"]["choices"]
        out.write(json.dumps({
            "id": item["id"],
            "question": item["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": item["answerKey"],
        }) + "\n")
PY
    rm -f "$DEST/arc_easy/official-test.jsonl.part"
    place arc_easy/ARC-Easy-Test.jsonl
fi
(cd "$DEST" && sha256sum --quiet -c "$SUMS") || { echo "fetch-evaldata: a file in $DEST does not match its checksum" >&2; exit 1; }
echo "fetch-evaldata: all files in $DEST match scripts/evaldata.sha256; use them with PTQ_EVALDATA=$DEST"
