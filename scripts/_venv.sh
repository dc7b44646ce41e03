# Sourced by scripts/*: create .venv if missing and install mossnode at the pinned versions.
# Reinstalls only when pyproject.toml or constraints.txt changed since the last install.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mossnode-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing mossnode and its pinned dependencies into .venv ..." >&2
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' \
      > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
