#!/usr/bin/env bash
# Regenerates every checked-in receipt in receipts/ from the project's own
# synthetic models. Run after a change to an engine, the comparator or a
# receipt field; review the diff like code.
#   scripts/regen-receipts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
bin=target/debug/divergence
models=target/receipt-models
mkdir -p "$models" receipts
prompt="The quick brown fox"

"$bin" gen-model --preset tiny --seed 1 -o "$models/tiny-bitnet.gguf" >/dev/null
"$bin" gen-model --preset tiny --arch llama --seed 1 -o "$models/tiny-llama.gguf" >/dev/null
"$bin" gen-model --preset small --seed 1 -o "$models/small-bitnet.gguf" >/dev/null
"$bin" gen-model --preset tiny --rope-theta 500000 --seed 1 -o "$models/tiny-bitnet-theta500k.gguf" >/dev/null
"$bin" gen-model --preset tiny --arch llama --untied-output --seed 1 -o "$models/tiny-llama-untied.gguf" >/dev/null
"$bin" gen-model --preset tiny --scale-tensors --seed 1 -o "$models/tiny-bitnet-scales.gguf" >/dev/null
# Arch bitnet-b1.58 (gpt2 vocab, published layout): tiny, and GQA shapes no
# preset has (groups of 5 with F16 embeddings, groups of 4 with F32), theta
# 500000 (tests/arch_b158.rs builds the same files).
"$bin" gen-model --preset tiny --arch bitnet-b1.58 --seed 1 -o "$models/tiny-b158.gguf" >/dev/null
"$bin" gen-model --preset tiny --arch bitnet-b1.58 --n-embd 640 --n-layer 2 --n-head 10 \
  --n-head-kv 2 --n-ff 768 --n-vocab 1024 --rope-theta 500000 --tiny-attn-norm --seed 1 \
  -o "$models/b158-gqa5.gguf" >/dev/null
"$bin" gen-model --preset tiny --arch bitnet-b1.58 --n-embd 384 --n-layer 3 --n-head 12 \
  --n-head-kv 3 --n-ff 512 --n-vocab 1024 --rope-theta 500000 --embd-type f32 --seed 1 \
  -o "$models/b158-gqa4.gguf" >/dev/null
# n_ff 320: ffn_down rows that are not whole I2_S blocks, as bitnet_b1_58-3B's 8640.
"$bin" gen-model --preset tiny --n-ff 320 --seed 1 -o "$models/tiny-bitnet-ff320.gguf" >/dev/null
# gpt2-vocab models get token ids (BOS, then "What is 2+2?" in the synthetic vocab)
# until the candidate has a BPE tokenizer.
tiny_b158_tokens=350,338,220,270,220,17,10,17,30
b158_tokens=768,338,220,270,220,17,10,17,30

# find exits 1 on a divergence and 5 when the candidate fails: results here, not failures.
find_receipt() {
  local code=0
  "$bin" find -q "$@" >/dev/null || code=$?
  [ "$code" -eq 0 ] || [ "$code" -eq 1 ] || [ "$code" -eq 5 ]
}

# Clean parity cases (the ones tests/parity.rs compares against).
for mode in resync free; do
  for kv in f16 f32; do
    find_receipt --model "$models/tiny-bitnet.gguf" --prompt "$prompt" --steps 4 --mode "$mode" \
      --threads 1 --kv "$kv" --receipt "receipts/parity-tiny-bitnet-$mode-t1-$kv.json"
  done
done
find_receipt --model "$models/tiny-llama.gguf" --prompt "$prompt" --steps 4 --mode resync \
  --threads 1 --kv f16 --receipt receipts/parity-tiny-llama-resync-t1-f16.json

# `small`, default prompt, 2 threads: the case that exposed our activation
# quantization's double rounding (see receipts/README.md).
find_receipt --model "$models/small-bitnet.gguf" --steps 4 --threads 2 \
  --receipt receipts/parity-small-bitnet-resync-t2-f16.json

# bitnet-b1.58 parity on GQA shapes (tests/arch_b158.rs).
for mode in resync free; do
  for shape in gqa5 gqa4; do
    find_receipt --model "$models/b158-$shape.gguf" --tokens "$b158_tokens" --steps 4 --mode "$mode" \
      --threads 1 --kv f16 --receipt "receipts/parity-b158-$shape-$mode-t1-f16.json"
  done
done

# Reference bugs the tool demonstrates: upstream's SiLU for bitnet-b1.58, on
# demand; ffn_down rows that are not whole I2_S blocks (tests/arch_b158.rs).
find_receipt --model "$models/tiny-b158.gguf" --tokens "$tiny_b158_tokens" --steps 2 \
  --reference-ffn-act silu --receipt receipts/zoo-reference-ffn-act-silu.json
find_receipt --model "$models/tiny-bitnet-ff320.gguf" --tokens 1,300,301,302,303 --steps 2 \
  --receipt receipts/zoo-reference-i2s-unaligned-rows.json

# The bug zoo: one receipt per injected candidate fault (docs/bug-zoo.md).
for fault in rope-interleaved gqa-modulo act-round-half-away act-scale128 act-scale-per-batch \
             missing-row-sum eps-hardcoded rms-norm-eps-outside-sqrt skip-attn-sub-norm \
             wrong-ffn-act attn-scale-inv-head-dim no-causal-mask weight-scale-divide \
             i2s-code-off-by-one swap-gate-up f16-row-stride o-proj-previous-layer \
             final-norm-wrong-weight rope-decode-off-by-one kv-slot-decode-off-by-one \
             panic-at-ffn-up; do
  find_receipt --model "$models/tiny-bitnet.gguf" --prompt "$prompt" --steps 2 \
    --inject "$fault" --receipt "receipts/zoo-$fault.json"
done
find_receipt --model "$models/tiny-bitnet-theta500k.gguf" --prompt "$prompt" --steps 2 \
  --inject theta-wrong-key --receipt receipts/zoo-theta-wrong-key.json
find_receipt --model "$models/tiny-llama-untied.gguf" --prompt "$prompt" --steps 2 \
  --inject logits-wrong-matrix --receipt receipts/zoo-logits-wrong-matrix.json
find_receipt --model "$models/tiny-bitnet-scales.gguf" --prompt "$prompt" --steps 2 \
  --inject scale-tensor-ignored --receipt receipts/zoo-scale-tensor-ignored.json
# Free mode: the same fault found by local error, with its propagation.
find_receipt --model "$models/tiny-bitnet.gguf" --prompt "$prompt" --steps 2 --mode free \
  --inject o-proj-previous-layer --receipt receipts/zoo-o-proj-previous-layer-free.json
find_receipt --model "$models/tiny-bitnet.gguf" --prompt "$prompt" --steps 2 --mode free \
  --inject-token duplicate-bos --receipt receipts/zoo-duplicate-bos.json
# Each side tokenizes for itself on the gpt2 vocabulary, and with --chat each
# formats the prompt with its own chat template: bitnet.cpp's C++ llama3
# branch writes no BOS, the Jinja template writes {{ bos_token }}, and both
# sides add BOS when tokenizing: the candidate's prompt has a duplicated BOS.
find_receipt --model "$models/tiny-b158.gguf" --prompt "What is 2+2?" --steps 2 \
  --receipt receipts/parity-tiny-b158-text-prompt.json
find_receipt --model "$models/tiny-b158.gguf" --prompt "What is 2+2?" --steps 2 --chat \
  --receipt receipts/zoo-chat-template-duplicate-bos.json
echo "receipts regenerated: $(ls receipts/*.json | wc -l) files"
