#!/usr/bin/env bash
# The peers bench/peers.py measures against, in their own environment
# (.tools/peers), never in the project's: ByzFL 0.0.11 without its dependencies
# (torch and numpy come from the project's .venv through a .pth file, so no second
# torch is downloaded) plus SciPy, which ByzFL's helpers import.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=.tools/peers
if [ -x "$PEERS/bin/python" ] && "$PEERS/bin/python" -c "import byzfl.aggregators.aggregators" 2>/dev/null; then
    exit 0
fi
python3 -m venv "$PEERS"
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mine=$("$PEERS/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$site" > "$mine/protogalaxy-venv.pth"
"$PEERS/bin/pip" install -q --no-deps -c constraints-peers.txt byzfl scipy
