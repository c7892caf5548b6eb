#!/usr/bin/env bash
# The thumbnails example, start to finish:
#   1. generate 40 sample images, plus a corrupt one and one that hangs the decoder;
#   2. thumbnail them all with `forkio map` (one worker per core, 5 s per image at most);
#   3. lay the thumbnails out in a contact-sheet PDF, failures listed on the last page.
# The two bad inputs fail on their own and everything else completes: that is the point,
# so this script exits 0 when exactly those two failed, and 1 otherwise.
#
# Usage: examples/thumbnails/run.sh [OUT_DIR]     (default: examples/thumbnails/out)
#        TIMEOUT=2 examples/thumbnails/run.sh     (a shorter per-image timeout)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# The repository's virtual environment if there is one, else the forkio on PATH (and its Python).
if [[ -x "$here/../../.venv/bin/forkio" ]]; then
    bin="$(cd "$here/../../.venv/bin" && pwd)"
elif command -v forkio >/dev/null; then
    bin="$(dirname "$(command -v forkio)")"
else
    echo "forkio not found: pip install -e '.[images,progress]' first" >&2
    exit 1
fi
python="$bin/python"
[[ -x "$python" ]] || python=python3

# The stuck input, images/stuck.jpg, is a named pipe: it stays there, so that running `forkio map`
# again (with --resume --retry-failed, say) hangs on it and times out again, as documented.
# Anything that opens it blocks: remove OUT_DIR (or that file) when you are done.

"$python" "$here/prepare.py" "$out"

status=0
THUMBS_DIR="$out/thumbs" "$bin/forkio" map "$here/thumbs.py:make_thumbnail" \
    --input "$out/inputs.txt" --timeout "${TIMEOUT:-5}" --preload PIL.Image \
    --output "$out/results.jsonl" || status=$?
# 1 means "some inputs failed", which we expect; anything else means the run itself went wrong.
if [[ $status -ne 0 && $status -ne 1 ]]; then
    echo "forkio map exited with status $status" >&2
    exit "$status"
fi

"$python" "$here/contact_sheet.py" "$out/results.jsonl" "$out/contact-sheet.pdf"

# Exactly the two planted inputs must have failed, each for its own reason.
"$python" - "$out/results.jsonl" <<'PY'
import json, os, sys

with open(sys.argv[1], encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
failed = {os.path.basename(r["input"]): r["error"]["kind"] for r in records if not r["ok"]}
expected = {"broken.jpg": "exception", "stuck.jpg": "timeout"}
if failed != expected:
    sys.exit(f"expected exactly these failures {expected}, got {failed}")
print(f"as planned: {len(records) - 2} thumbnails made; broken.jpg raised, stuck.jpg timed out")
PY

echo "PDF: $out/contact-sheet.pdf"
