#!/usr/bin/env bash
# Make sure the demo's data is present: the Debian package dataset-fashion-mnist puts the four idx files
# under /usr/share/datasets/fashion-mnist. Installs it where apt-get is available; says what to do elsewhere.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "Fashion-MNIST is missing: installing the Debian package dataset-fashion-mnist" >&2
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  exit 0
fi
cat >&2 <<MSG
Fashion-MNIST was not found in $dir and apt-get is not available here.
Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz in a folder and run:  .venv/bin/skipnet demo --data-root THAT_FOLDER
MSG
exit 1
