#!/usr/bin/env bash
# llama.cpp's own GGUF converter (`convert_hf_to_gguf.py`), from the llama-cpp-python source package on PyPI:
# nothing is built (building llama.cpp takes ~30 min on 2 cores; bench/llama_cpp.py runs llama.cpp itself).
# Prints the converter's path, for GENESIS_LLAMA_CPP_CONVERTER, which turns on
# tests/test_export_formats.py's converter test (llama.cpp's converter reads an exported directory as
# `genesis export-gguf` does). The version is the one BENCHMARKS.md's round trip was measured with.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
DIR=.llama-cpp-src
CONVERTER="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
if [ ! -f "$CONVERTER" ]; then
    rm -rf "$DIR" && mkdir -p "$DIR"
    .venv/bin/python -m pip download -q --disable-pip-version-check "llama-cpp-python==$VERSION" --no-deps \
        --no-binary :all: -d "$DIR" >&2
    # the converter, its conversion package and the gguf-py it puts first on its path (not the 217 MB of sources)
    tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py" "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion"
    rm "$DIR/llama_cpp_python-$VERSION.tar.gz"
fi
echo "$PWD/$CONVERTER"
