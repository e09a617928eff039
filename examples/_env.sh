# Shared bootstrap for tests/run.sh and examples/*.sh: sets PY to a Python with megalong installed.
# MEGALONG_PYTHON=/path/to/python reuses an existing environment; otherwise .venv is created.
# torch is installed first, pinned to the CPU build on this disk, so no dependency can pull a
# multi-GB CUDA build onto a CPU machine.
megalong_env() {
    local extra="${1:-}"
    if [[ -n "${MEGALONG_PYTHON:-}" ]]; then
        PY="$MEGALONG_PYTHON"
        return
    fi
    local venv="$root/.venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "[megalong] creating $venv" >&2
        python3 -m venv "$venv"
    fi
    PY="$venv/bin/python"
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "[megalong] installing torch==${MEGALONG_TORCH:-2.13.0}" >&2
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q "torch==${MEGALONG_TORCH:-2.13.0}"
    fi
    local spec="$root"
    [[ -n "$extra" ]] && spec="$root[$extra]"
    local stamp="$venv/.megalong-installed-$extra"
    if [[ ! -f "$stamp" || "$root/setup.py" -nt "$stamp" ]]; then
        echo "[megalong] installing megalong${extra:+[$extra]}" >&2
        "$PY" -m pip install -q -e "$spec"
        touch "$stamp"
    fi
}
