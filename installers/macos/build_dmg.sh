#!/usr/bin/env bash
# Build "Mesh Agent.app" (PyInstaller, one folder) and dist/MeshAgent-VERSION-macos-ARCH.dmg.
# Runs on macOS 11+ (e.g. a GitHub macos-14 runner for arm64, macos-13 for x86_64; build on each
# architecture you ship, PyInstaller does not cross-build):
#
#   installers/macos/build_dmg.sh [--keep-venv] [--smoke]
#
#   --keep-venv  reuse build/packaging/venv and its dependencies if it exists (the package
#                itself is reinstalled from the tree)
#   --smoke      run installers/smoke_test.sh on the app's binary before packing the dmg
#
# Environment: PYTHON (default python3, >= 3.11; python.org's universal2 build or Homebrew's),
# MESHAGENT_CODESIGN_IDENTITY ("Developer ID Application: ..."; unset: ad-hoc signed, for local
# use only), MESHAGENT_NOTARY_PROFILE (a `xcrun notarytool store-credentials` profile; set it to
# notarise and staple the dmg, which Gatekeeper needs for downloads).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
BUILD="$ROOT/build/packaging"
DIST="$ROOT/dist"
VENV="$BUILD/venv"
PYTHON="${PYTHON:-python3}"
ENTITLEMENTS="$ROOT/installers/macos/entitlements.plist"
IDENTITY="${MESHAGENT_CODESIGN_IDENTITY:-}"

keep_venv=0 smoke=0
for arg in "$@"; do
  case "$arg" in
    --keep-venv) keep_venv=1 ;;
    --smoke) smoke=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "build_dmg.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "== $*"; }
die() { echo "build_dmg.sh: $*" >&2; exit 1; }
[ "$(uname -s)" = Darwin ] || die "this builds a macOS app: run it on macOS"

# ---------------------------------------------------------------- throwaway build venv
if [ "$keep_venv" = 0 ] || [ ! -x "$VENV/bin/python" ]; then
  say "fresh build venv in $VENV"
  rm -rf "$VENV"
  mkdir -p "$BUILD"
  "$PYTHON" -m venv "$VENV"
  target="."
  [ -d meshagent_gui/ui ] && target=".[gui]"
  "$VENV/bin/python" -m pip install -q "pyinstaller>=6.10,<7" "$target"
else
  # A kept venv keeps its dependencies, but the package itself is always the current tree.
  "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall .
fi
VERSION="$("$VENV/bin/python" -c 'import meshagent_gui; print(meshagent_gui.__version__)')"

# ---------------------------------------------------------------- PyInstaller -> .app
say "PyInstaller: dist/Mesh Agent.app"
# The spec signs every binary it collects with MESHAGENT_CODESIGN_IDENTITY and the entitlements
# (ad hoc when unset).
MESHAGENT_CODESIGN_IDENTITY="$IDENTITY" "$VENV/bin/pyinstaller" --noconfirm --log-level WARN \
  --distpath "$DIST" --workpath "$BUILD/work-macos" installers/meshagent.spec
APP="$DIST/Mesh Agent.app"
BIN="$APP/Contents/MacOS/meshagent"
"$BIN" --version >/dev/null || die "the app's binary does not run: $BIN --version"

if [ -n "$IDENTITY" ]; then
  say "signing the app (hardened runtime) as $IDENTITY"
  codesign --force --deep --options runtime --timestamp --entitlements "$ENTITLEMENTS" \
    --sign "$IDENTITY" "$APP"
  codesign --verify --deep --strict --verbose=2 "$APP"
fi

# The file secret store keeps the smoke test's throwaway secrets out of the login keychain.
if [ "$smoke" = 1 ]; then MESHAGENT_SECRET_STORE="file" bash installers/smoke_test.sh "$BIN"; fi

# ---------------------------------------------------------------- .dmg
DMG="$DIST/MeshAgent-$VERSION-macos-$(uname -m).dmg"
say "hdiutil -> ${DMG#"$ROOT"/}"
STAGE="$BUILD/dmg"
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -R "$APP" "$STAGE/"
ln -s /Applications "$STAGE/Applications"
rm -f "$DMG"
hdiutil create -volname "Mesh Agent" -srcfolder "$STAGE" -fs HFS+ -format UDZO -ov "$DMG" >/dev/null

if [ -n "$IDENTITY" ]; then
  codesign --force --timestamp --sign "$IDENTITY" "$DMG"
fi
if [ -n "${MESHAGENT_NOTARY_PROFILE:-}" ]; then
  [ -n "$IDENTITY" ] || die "notarisation needs a Developer ID signature (MESHAGENT_CODESIGN_IDENTITY)"
  say "notarising (this waits for Apple's answer)"
  xcrun notarytool submit "$DMG" --keychain-profile "$MESHAGENT_NOTARY_PROFILE" --wait
  xcrun stapler staple "$DMG"
  spctl --assess --type open --context context:primary-signature --verbose "$DMG"
fi
say "built $DMG"
