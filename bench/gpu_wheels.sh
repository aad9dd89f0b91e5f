# Sourced by the GPU scripts (bench/gpu_pipeline.sh, bench/gpu_reporter.sh): the GPU machine has no network and
# lacks some of the project's pins, so they travel as CPython 3.12 wheels in .whl/ (git-ignored; a device call
# carries at most 64 MiB) and are installed into a folder of /tmp on PYTHONPATH. Needs PY and SCRIPT set.

# fetch_wheels PIN...: download the pinned wheels into .whl/ (here, with a registry).
fetch_wheels() {
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$@"
  du -sh .whl
}

# ensure_imports "import a, b": when the imports fail, install .whl/*.whl into $SLIDECACHE_SITE (on the GPU).
ensure_imports() {
  if ! "$PY" -c "$1" 2>/dev/null; then
    [[ -d .whl ]] || { echo "$SCRIPT: '$1' fails and there is no .whl/ here: run 'bash bench/$SCRIPT" \
                            "--fetch-wheels' on a machine with a registry, then carry .whl" >&2; exit 2; }
    SITE=${SLIDECACHE_SITE:-/tmp/slidecache-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
}
