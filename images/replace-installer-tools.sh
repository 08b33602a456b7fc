#!/bin/sh
# replace-installer-tools FILE: installs into /opt/venv the pip and setuptools that the requirements
# file FILE pins (`pip==X`, `setuptools==Y`), replacing the vulnerable ones venv bundles.
set -eu
pins=/tmp/installer-tools.txt
grep -E '^(pip|setuptools)==' "$1" >"$pins" || true
if [ "$(wc -l <"$pins")" -ne 2 ]; then
    echo "replace-installer-tools: $1 must pin pip==<version> and setuptools==<version>, one line each" >&2
    exit 1
fi
/opt/venv/bin/pip install --requirement "$pins"
rm -f "$pins"
