#!/usr/bin/env bash
# Fetches llama.cpp's real tokenizer test vocabularies into target/vocab/
# (git-ignored, never committed). They ship inside the PyPI source
# distribution of llama-cpp-python 0.3.36, under vendor/llama.cpp/models/:
#   ggml-vocab-llama-bpe.gguf{,.inp,.out}  llama3 (gpt2 BPE, 128256 tokens)
#   ggml-vocab-llama-spm.gguf{,.inp,.out}  llama2 (SentencePiece, 32000 tokens)
# Idempotent: files already present and verified are kept, and the archive
# is downloaded only when one is missing.
#   scripts/fetch-vocab.sh [DEST]      (DEST defaults to target/vocab)
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${1:-target/vocab}
version=0.3.36
archive=llama_cpp_python-$version.tar.gz
archive_sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
bpe_sha256=97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e
files=(
  ggml-vocab-llama-bpe.gguf ggml-vocab-llama-bpe.gguf.inp ggml-vocab-llama-bpe.gguf.out
  ggml-vocab-llama-spm.gguf ggml-vocab-llama-spm.gguf.inp ggml-vocab-llama-spm.gguf.out
)

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

complete() {
  for f in "${files[@]}"; do [ -s "$dest/$f" ] || return 1; done
  [ "$(sha256_of "$dest/ggml-vocab-llama-bpe.gguf")" = "$bpe_sha256" ]
}

if complete; then
  echo "fetch-vocab: $dest is complete and verified"
  exit 0
fi

mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The archive is cached beside the files, so a second run after a partial
# extraction does not download 77 MB again.
cached="$dest/$archive"
if [ ! -f "$cached" ] || [ "$(sha256_of "$cached")" != "$archive_sha256" ]; then
  # Only this package as a source download: pip still prepares the sdist's
  # metadata, which installs its build backend (scikit-build-core, CMake,
  # ninja); with --no-binary :all: those were built from source too
  # (minutes on 2 cores) on a machine without cmake. As wheels: seconds.
  echo "fetch-vocab: downloading $archive from PyPI"
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    --dest "$work" "llama-cpp-python==$version"
  mv "$work/$archive" "$cached"
fi
got=$(sha256_of "$cached")
if [ "$got" != "$archive_sha256" ]; then
  echo "fetch-vocab: $archive has sha256 $got, expected $archive_sha256" >&2
  rm -f "$cached"
  exit 1
fi

members=()
for f in "${files[@]}"; do
  members+=("llama_cpp_python-$version/vendor/llama.cpp/models/$f")
done
tar -xzf "$cached" -C "$work" "${members[@]}"
for f in "${files[@]}"; do
  mv "$work/llama_cpp_python-$version/vendor/llama.cpp/models/$f" "$dest/$f"
done

got=$(sha256_of "$dest/ggml-vocab-llama-bpe.gguf")
if [ "$got" != "$bpe_sha256" ]; then
  echo "fetch-vocab: ggml-vocab-llama-bpe.gguf has sha256 $got, expected $bpe_sha256" >&2
  exit 1
fi
rm -f "$cached"
echo "fetch-vocab: wrote ${#files[@]} files to $dest"
