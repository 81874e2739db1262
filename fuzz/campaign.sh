#!/usr/bin/env bash
# Seeds each fuzz target's corpus from the fixtures and runs it for SECONDS
# (default 1800) under a 2 GiB RSS limit; crashes land in
# fuzz/artifacts/TARGET/. Usage: fuzz/campaign.sh TARGET [SECONDS]
# Needs nightly and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1
seconds=${2:-1800}
corpus=fuzz/corpus/$target
mkdir -p "$corpus"
case $target in
  onnx_import)
    for f in fixtures/iris/relu.onnx fixtures/iris/gelu.onnx fixtures/iris/prelu.onnx \
             fixtures/cnn/lenet5.onnx fixtures/cnn/resnet_small.onnx fixtures/cnn/densenet_small.onnx \
             fixtures/modern/*.onnx fixtures/mtcnn/pnet*.onnx fixtures/mtcnn/rnet.onnx \
             fixtures/conformance/*/model.onnx; do
      [ -f "$f" ] && cp "$f" "$corpus/$(echo "$f" | tr / _)"
    done ;;
  npy)
    for f in fixtures/iris/inputs.npy fixtures/iris/relu.logits.npy fixtures/cnn/lenet5.logits.npy; do
      [ -f "$f" ] && cp "$f" "$corpus/$(basename "$f")"
    done ;;
  idx)
    printf '\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00\x04%s' "0123456789abcdefghijklmnopqrstuv" > "$corpus/images"
    printf '\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02\x03' > "$corpus/labels"
    gzip -c "$corpus/images" > "$corpus/images.gz" ;;
  options)
    for s in all top1 top3 0,1,2 'x.npy[3]' 'x.gz[0..8]' 512M 4G 1.5K '1,2,3' '-1e300,nan'; do
      printf '%s' "$s" > "$corpus/$(echo "$s" | md5sum | cut -c1-12)"
    done ;;
esac
cargo +nightly fuzz run -O --debug-assertions "$target" "$corpus" -- \
  -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 -max_len=2000000 -print_final_stats=1
