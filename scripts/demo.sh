#!/bin/sh
# `make demo`: a two-turn conversation in two separate `fusion send` processes on the
# default file store, offline (the echo provider: no key, no network). The demo uses a
# session of its own, `demo`, cleared first, so running it again gives the same result.
set -eu
export FUSION_PROVIDER=echo
unset FUSION_STORAGE FUSION_SESSION 2>/dev/null || true

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

fusion clear -s demo

say 'fusion send -s demo "Remember: my name is Alice"'
fusion send -s demo "Remember: my name is Alice"

say 'echo "What is my name?" | fusion send -s demo      # a new process'
echo "What is my name?" | fusion send -s demo

say 'fusion count -s demo'
fusion count -s demo

say 'fusion show -s demo      # the stored history: system prompt, messages, answers'
fusion show -s demo

store=$(fusion where)
cat <<TEXT

The second process remembered the first: the session lives in
  $store/demo.json
Look at it with:  fusion show -s demo   (or: fusion show -s demo --json)

That was the offline 'echo' provider. To talk to a real model:
  OpenAI:     export OPENAI_API_KEY=sk-...        then: fusion send -s demo "Hello"
  Anthropic:  export ANTHROPIC_API_KEY=sk-ant-... then: fusion send -s demo "Hello"
  Ollama:     export FUSION_BASE_URL=http://localhost:11434/v1 FUSION_MODEL=llama3.2
TEXT
