# kvmscope tasks. `just --list` shows them.
set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list
