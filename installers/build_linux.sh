#!/usr/bin/env bash
# Build the Linux `meshagent` binary with PyInstaller, then a .deb (dpkg-deb) and, where
# rpmbuild exists, an .rpm, from one staged file tree.
#
#   installers/build_linux.sh [--onefile] [--keep-venv] [--binary-only]
#
#   --onefile      also build the one-file binary dist/meshagent-VERSION-linux-ARCH
#                  (slower to start: see installers/README.md; the packages use the folder)
#   --keep-venv    reuse build/packaging/venv and its dependencies if it exists (quicker
#                  rebuilds while editing; the package itself is reinstalled from the tree)
#   --binary-only  stop after the one-folder binary (dist/meshagent/)
#
# Environment: PYTHON (default python3, >= 3.11, built with a shared libpython as PyInstaller
# needs), MESHAGENT_MAINTAINER (the packages' Maintainer field).
#
# Everything it makes lands in build/packaging/ (throwaway venv, PyInstaller work dir, staged
# tree) and dist/ (meshagent/, meshagent_VERSION_ARCH.deb, meshagent-VERSION-1.ARCH.rpm);
# both are git-ignored. Needs: the Python above with venv and pip reaching PyPI, dpkg-deb;
# optional: objdump (binutils) to compute the glibc the binary needs, patchelf (drops the
# build machine's RUNPATHs from the bundled libraries), rpmbuild (package rpm).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BUILD="$ROOT/build/packaging"
DIST="$ROOT/dist"
VENV="$BUILD/venv"
PYTHON="${PYTHON:-python3}"
PYINSTALLER_REQ="pyinstaller>=6.10,<7"

onefile=0 keep_venv=0 binary_only=0
for arg in "$@"; do
  case "$arg" in
    --onefile) onefile=1 ;;
    --keep-venv) keep_venv=1 ;;
    --binary-only) binary_only=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "build_linux.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "== $*"; }
die() { echo "build_linux.sh: $*" >&2; exit 1; }
started=$SECONDS

# ---------------------------------------------------------------- throwaway build venv
"$PYTHON" - <<'EOF' || die "$PYTHON must be Python >= 3.11 with a shared libpython (PyInstaller needs it)"
import sys, sysconfig
sys.exit(sys.version_info < (3, 11) or not sysconfig.get_config_var("Py_ENABLE_SHARED"))
EOF
if [ "$keep_venv" = 0 ] || [ ! -x "$VENV/bin/python" ]; then
  say "fresh build venv in $VENV (the package, its runtime dependencies and PyInstaller only)"
  rm -rf "$VENV"
  mkdir -p "$BUILD"
  "$PYTHON" -m venv "$VENV"
  target="."
  # The desktop app and its Qt join the build as soon as the ui package exists.
  [ -d meshagent_gui/ui ] && target=".[gui]"
  "$VENV/bin/python" -m pip install "$PYINSTALLER_REQ" "$target" >"$BUILD/pip.log" 2>&1 \
    || { tail -n 30 "$BUILD/pip.log" >&2; die "pip install failed (log: $BUILD/pip.log)"; }
else
  # A kept venv keeps its dependencies, but the package itself is always the current tree.
  say "reusing $VENV; reinstalling the package from the tree"
  "$VENV/bin/python" -m pip install --no-deps --force-reinstall . >"$BUILD/pip.log" 2>&1 \
    || { tail -n 30 "$BUILD/pip.log" >&2; die "pip install failed (log: $BUILD/pip.log)"; }
fi
VERSION="$("$VENV/bin/python" -c 'import meshagent_gui; print(meshagent_gui.__version__)')"
ARCH_DEB="$(dpkg --print-architecture 2>/dev/null || uname -m)"
ARCH_RPM="$(uname -m)"

# ---------------------------------------------------------------- PyInstaller
# pyinstaller LOG ARGS...: quiet unless it fails; its warnings stay in the log.
pyinstaller() {
  local log="$BUILD/$1"
  shift
  "$VENV/bin/pyinstaller" --noconfirm --log-level WARN "$@" >"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; die "PyInstaller failed (log: $log)"; }
}
say "PyInstaller: one-folder binary -> dist/meshagent/"
pyinstaller pyinstaller-onedir.log --distpath "$DIST" --workpath "$BUILD/work-onedir" installers/meshagent.spec
BIN="$DIST/meshagent/meshagent"
# A pyenv-built Python leaves its own lib dir as RUNPATH in each extension module; the bundle
# must not search the build machine's paths, so absolute RUNPATHs go (patchelf, if present).
if command -v patchelf >/dev/null; then
  while IFS= read -r -d '' lib; do
    rpath="$(patchelf --print-rpath "$lib" 2>/dev/null || true)"
    # shellcheck disable=SC2016 # a literal $ORIGIN: RUNPATHs relative to the library stay
    case "$rpath" in "" | *'$ORIGIN'*) ;; *) patchelf --remove-rpath "$lib" ;; esac
  done < <(find "$DIST/meshagent" -type f -name '*.so*' -print0)
fi
"$BIN" --version >/dev/null || die "the built binary does not run: $BIN --version"
if [ "$onefile" = 1 ]; then
  say "PyInstaller: one-file binary"
  # Its own distpath: the one-file binary is also named meshagent, like the folder in dist/.
  pyinstaller pyinstaller-onefile.log --distpath "$BUILD/dist-onefile" --workpath "$BUILD/work-onefile" \
    installers/meshagent.spec -- --onefile
  mv -f "$BUILD/dist-onefile/meshagent" "$DIST/meshagent-$VERSION-linux-$ARCH_RPM"
fi
[ "$binary_only" = 1 ] && { say "done in $((SECONDS - started)) s: $BIN"; exit 0; }

# ---------------------------------------------------------------- staged file tree
STAGE="$BUILD/root"
say "staging the package tree in $STAGE"
rm -rf "$STAGE"
mkdir -p "$STAGE/usr/bin" "$STAGE/usr/lib" "$STAGE/usr/share/applications" \
  "$STAGE/usr/share/doc/meshagent" "$STAGE/usr/share/icons/hicolor/scalable/apps" \
  "$STAGE/usr/share/metainfo"
cp -a "$DIST/meshagent" "$STAGE/usr/lib/meshagent"
ln -s ../lib/meshagent/meshagent "$STAGE/usr/bin/meshagent"
install -m 0644 resources/meshagent.desktop "$STAGE/usr/share/applications/"
# AppStream metadata: software centres list the app from it (validated by check_recipes.sh).
install -m 0644 resources/org.meshagent.MeshAgent.metainfo.xml "$STAGE/usr/share/metainfo/"
install -m 0644 resources/icons/meshagent.svg "$STAGE/usr/share/icons/hicolor/scalable/apps/"
for size in 16 24 32 48 64 128 256 512; do
  dir="$STAGE/usr/share/icons/hicolor/${size}x${size}/apps"
  mkdir -p "$dir"
  install -m 0644 "resources/icons/meshagent-$size.png" "$dir/meshagent.png"
done
install -m 0644 installers/linux/copyright "$STAGE/usr/share/doc/meshagent/copyright"
MAINTAINER="${MESHAGENT_MAINTAINER:-Mesh Agent maintainers <maintainers@meshagent.invalid>}"
printf 'meshagent (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- %s  %s\n' \
  "$VERSION" "$VERSION" "$MAINTAINER" "$(date -R)" \
  | gzip -9n >"$STAGE/usr/share/doc/meshagent/changelog.gz"
# Root-owned in the package (dpkg-deb --root-owner-group); nobody but root may write; shared
# libraries need no execute bit.
chmod -R u+rwX,go+rX,go-w "$STAGE"
find "$STAGE/usr/lib/meshagent" -type f -name '*.so*' -exec chmod 0644 {} +

# The newest glibc symbol version any bundled ELF file asks for is the package's glibc floor.
glibc=""
if command -v objdump >/dev/null; then
  glibc="$(find "$STAGE/usr/lib/meshagent" -type f \( -name '*.so*' -o -perm -u+x \) -print0 \
    | xargs -0 objdump -T 2>/dev/null | grep -oE 'GLIBC_[0-9]+\.[0-9]+' | cut -d_ -f2 \
    | sort -t. -k1,1n -k2,2n -u | tail -n 1 || true)"
fi
[ -n "$glibc" ] || glibc="$(getconf GNU_LIBC_VERSION | awk '{print $2}')"

# The X11 libraries Qt's xcb plugin links and a stock desktop may lack (libxcb-icccm4,
# libxcb-keysyms1, libxcb-cursor0): the packages bring them, from the one list `meshagent gui`
# checks before it starts (meshagent_gui/ui/system_libraries.py), Debian and RPM names.
xcb_packages() {
  "$VENV/bin/python" -c 'import sys
from meshagent_gui.ui.system_libraries import XCB_LIBRARIES
print(sys.argv[1].join(sorted({names[int(sys.argv[2])] for names in XCB_LIBRARIES.values()})))' "$@"
}
xcb_debs="$(xcb_packages ', ' 0)"
xcb_rpms="$(xcb_packages ' ' 1)"

# ---------------------------------------------------------------- .deb
DEB="$DIST/meshagent_${VERSION}_${ARCH_DEB}.deb"
say "dpkg-deb -> ${DEB#"$ROOT"/}"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"
mkdir -p "$STAGE/DEBIAN"
sed -e "s/@VERSION@/$VERSION/" \
  -e "s/@ARCH@/$ARCH_DEB/" \
  -e "s/@MAINTAINER@/$MAINTAINER/" \
  -e "s/@INSTALLED_SIZE@/$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)/" \
  -e "s/@DEPENDS@/libc6 (>= $glibc), $xcb_debs/" \
  installers/linux/control.in >"$STAGE/DEBIAN/control"
rm -f "$DEB"
# No maintainer scripts: dpkg triggers of desktop-file-utils and the icon themes refresh the
# menu and icon caches on install and removal.
dpkg-deb --root-owner-group -Zxz -z6 --build "$STAGE" "$DEB" >/dev/null
rm -rf "$STAGE/DEBIAN"

# ---------------------------------------------------------------- .rpm (where rpmbuild exists)
if command -v rpmbuild >/dev/null; then
  say "rpmbuild -> dist/meshagent-$VERSION-1.$ARCH_RPM.rpm"
  TOP="$BUILD/rpm"
  rm -rf "$TOP"
  mkdir -p "$TOP/SPECS" "$TOP/RPMS"
  sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH_RPM/" -e "s/@GLIBC@/$glibc/" \
    -e "s/@XCB@/$xcb_rpms/" \
    -e "s|@STAGING@|$STAGE|" installers/linux/meshagent.rpm.spec.in >"$TOP/SPECS/meshagent.spec"
  # --nodeps: the build host may be Debian, with no rpm database to check build deps against.
  rpmbuild -bb --nodeps --quiet --define "_topdir $TOP" --target "$ARCH_RPM" \
    "$TOP/SPECS/meshagent.spec" >"$BUILD/rpmbuild.log" 2>&1 \
    || { cat "$BUILD/rpmbuild.log" >&2; die "rpmbuild failed"; }
  mv -f "$TOP/RPMS/$ARCH_RPM/meshagent-$VERSION-1.$ARCH_RPM.rpm" "$DIST/"
else
  say "rpmbuild not found: no .rpm (apt-get install rpm, or dnf install rpm-build)"
fi

say "done in $((SECONDS - started)) s"
du -sh "$DIST"/meshagent* 2>/dev/null || true
