#!/usr/bin/env bash
# The same four calls with curl. Run `make serve` first, then: bash examples/curl.sh
set -euo pipefail
BASE_URL="${LORASERVE_BASE_URL:-http://127.0.0.1:8080/v1}"

echo "# chat"
curl -sS --fail-with-body "$BASE_URL/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "",
  "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
  "max_tokens": 32, "temperature": 0
}'
echo

echo "# chat, streamed (server-sent events)"
curl -sS -N --fail-with-body "$BASE_URL/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "",
  "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
  "max_tokens": 32, "temperature": 0, "stream": true
}'

echo "# completion"
curl -sS --fail-with-body "$BASE_URL/completions" -H 'Content-Type: application/json' -d '{
  "model": "", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0
}'
echo

echo "# completion, streamed"
curl -sS -N --fail-with-body "$BASE_URL/completions" -H 'Content-Type: application/json' -d '{
  "model": "", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stream": true
}'
