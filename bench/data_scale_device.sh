#!/usr/bin/env bash
# bench/data_scale.py on a lent GPU machine's CPUs (16 cores, an otherwise idle box), from a bare Python 3.12 with
# numpy, pyarrow, tqdm and tokenizers: the wheels it lacks travel in the git-ignored .whl/ (pydantic, xxhash) and
# .whl-data/ (dask + distributed and what they need beyond the image; datatrove and its pure-Python
# dependencies), e.g.
#   run(command="bash bench/data_scale_device.sh --sizes 0.25 1 4 --workers 14 --skip-datatrove", carry=[".whl", ".whl-data"])
# (every argument goes to bench/data_scale.py; copy ../shared/data/pretrain to .whl-data/kit first)
# Results go to bench/results/data_scale.json and are copied to $OUT.
set -euo pipefail
# The data kit the scale corpus is cut from, where bench/scale_corpus.py looks for it (../shared/data), when the
# copy of the tree has no ../shared beside it: carried as .whl-data/kit (a transport copy, never committed).
if [ ! -d ../shared/data/pretrain ] && [ -d .whl-data/kit ]; then
    mkdir -p ../shared/data/pretrain && cp .whl-data/kit/*.jsonl.gz ../shared/data/pretrain/
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl-data/dask/*.whl
mkdir -p /tmp/dt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/dt .whl-data/dt/*.whl
tar -xzf .whl-data/dt/datatrove-*-site.tar.gz -C /tmp/dt
export PYTHONPATH=/tmp/site
printf '#!/bin/sh\nexec python3 -m cli.main "$@"\n' > /tmp/genesis
printf '#!/bin/sh\nPYTHONPATH=/tmp/dt:/tmp/site exec python3 "$@"\n' > /tmp/datatrove-python
chmod +x /tmp/genesis /tmp/datatrove-python
python3 bench/data_scale.py --work /tmp/data-scale --genesis /tmp/genesis --datatrove-python /tmp/datatrove-python \
    "$@" || status=$?
cp bench/results/data_scale.json "${OUT:-/tmp}/" 2>/dev/null || true
cp -r /tmp/data-scale/logs "${OUT:-/tmp}/" 2>/dev/null || true
exit "${status:-0}"
