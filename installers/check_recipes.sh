#!/usr/bin/env bash
# Check the installer recipes with the tools this (Linux) machine has, short of the target OS:
# shell scripts (shellcheck), the PyInstaller spec (compiles), the .desktop entry
# (desktop-file-validate), the AppStream metainfo (appstreamcli validate), the macOS plists
# (well-formed, valid plists), the WiX recipe (msitools' wixl links it against stand-in files
# into a real MSI, and the MSI's tables are checked), the PowerShell build script (parsed, where
# pwsh exists) and the icon set. A tool that is missing
# is reported as "skip", not as a failure.
#
#   installers/check_recipes.sh
#
# Debian/Ubuntu tools: shellcheck desktop-file-utils appstream libxml2-utils libplist-utils wixl
# msitools
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
failures=0
ok() { echo "ok   $*"; }
skip() { echo "skip $*: tool not installed"; }
bad() { echo "FAIL $*" >&2; failures=$((failures + 1)); }
have() { command -v "$1" >/dev/null; }
PYTHON="${PYTHON:-python3}"

# ---------------------------------------------------------------- shell scripts
scripts=(installers/*.sh installers/macos/*.sh)
[ -f .ci/packaging ] && scripts+=(.ci/packaging)
if have shellcheck; then
  if shellcheck "${scripts[@]}"; then ok "shellcheck: ${scripts[*]}"; else bad "shellcheck"; fi
else
  for script in "${scripts[@]}"; do bash -n "$script" || bad "bash -n $script"; done
  skip "shellcheck, only bash -n (shellcheck)"
fi

# ---------------------------------------------------------------- PyInstaller spec, icon script
if "$PYTHON" -c 'import sys; [compile(open(p).read(), p, "exec") for p in sys.argv[1:]]' \
  installers/meshagent.spec installers/entry.py installers/make_icons.py installers/hooks/*.py; then
  ok "meshagent.spec, entry.py, make_icons.py and the runtime hooks compile"
else
  bad "meshagent.spec, entry.py or make_icons.py does not compile"
fi

# ---------------------------------------------------------------- icons
missing=()
for size in 16 24 32 48 64 128 256 512 1024; do
  [ -s "resources/icons/meshagent-$size.png" ] || missing+=("meshagent-$size.png")
done
[ "$(head -c 4 resources/icons/meshagent.ico | od -An -tx1 | tr -d ' ')" = "00000100" ] \
  || missing+=("meshagent.ico (not an ICO)")
[ "$(head -c 4 resources/icons/meshagent.icns)" = "icns" ] || missing+=("meshagent.icns (not ICNS)")
if [ "${#missing[@]}" -eq 0 ]; then
  ok "icon set: SVG, PNG 16-1024, ICO, ICNS"
else
  bad "icons missing or wrong: ${missing[*]} (run installers/make_icons.py)"
fi

# ---------------------------------------------------------------- Linux menu entry
if have desktop-file-validate; then
  if desktop-file-validate resources/meshagent.desktop; then ok "meshagent.desktop validates"
  else bad "meshagent.desktop"; fi
else
  skip "meshagent.desktop not validated (desktop-file-validate)"
fi

# ---------------------------------------------------------------- AppStream metadata
metainfo=resources/org.meshagent.MeshAgent.metainfo.xml
if have appstreamcli; then
  # --no-net: the homepage is not fetched. Infos and pedantic notes pass; warnings fail.
  if appstreamcli validate --no-net "$metainfo"; then ok "$metainfo validates (appstreamcli)"
  else bad "$metainfo (appstreamcli validate)"; fi
else
  skip "$metainfo not validated (appstreamcli, Debian package appstream)"
fi
if [ "$(sed -n 's|.*<launchable type="desktop-id">\(.*\)</launchable>.*|\1|p' "$metainfo")" \
  != "$(basename resources/meshagent.desktop)" ]; then
  bad "$metainfo does not launch meshagent.desktop"
fi

# ---------------------------------------------------------------- macOS plists
before=$failures
for plist in installers/macos/Info.plist installers/macos/entitlements.plist; do
  if have plutil && [ "$(uname -s)" = Darwin ]; then
    plutil -lint "$plist" >/dev/null || bad "plutil -lint $plist"
  fi
  if have xmllint; then xmllint --noout "$plist" || bad "xmllint $plist"; fi
  if have plistutil; then
    plistutil -i "$plist" -f bin -o /dev/null >/dev/null || bad "plistutil $plist"
  fi
  "$PYTHON" -c 'import plistlib, sys; plistlib.load(open(sys.argv[1], "rb"))' "$plist" \
    || bad "plistlib cannot read $plist"
done
[ "$failures" -eq "$before" ] && ok "Info.plist and entitlements.plist are valid plists"

# ---------------------------------------------------------------- WiX recipe
if have xmllint; then
  if xmllint --noout installers/windows/meshagent.wxs; then ok "meshagent.wxs is well-formed XML"
  else bad "meshagent.wxs is not well-formed"; fi
fi
if have wixl && have wixl-heat && have msiinfo; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  # Stand-ins for the one-folder Windows build, harvested the way heat.exe does it.
  mkdir -p "$work/src/_internal"
  for file in meshagent.exe meshagentw.exe _internal/python311.dll _internal/base_library.zip; do
    echo "stand-in" >"$work/src/$file"
  done
  cp resources/icons/meshagent.ico "$work/"
  # wixl knows no Environment, UI or feature conditions: those lines go; the rest is linked.
  sed '/<Environment /d; /<UIRef /d; /<WixVariable /d; /<Condition Level=/d' \
    installers/windows/meshagent.wxs >"$work/meshagent.wxs"
  (
    cd "$work"
    find src -type f | sort | wixl-heat --prefix src/ --directory-ref INSTALLFOLDER \
      --component-group AppFiles --var var.SourceDir --win64 >AppFiles.wxs
    wixl -a x64 -D Version=1.2.3 -D Win64=yes -D SourceDir=src -D IconFile=meshagent.ico \
      -o test.msi meshagent.wxs AppFiles.wxs 2>wixl.log
  ) || { cat "$work/wixl.log" >&2; bad "wixl could not build the MSI"; }
  if [ -s "$work/test.msi" ]; then
    before=$failures
    expect() { # expect TABLE PATTERN WHAT (the table read whole first: grep -q + pipefail)
      local table
      table="$(msiinfo export "$work/test.msi" "$1" 2>/dev/null)" || true
      grep -qE "$2" <<<"$table" || bad "MSI: $3"
    }
    expect Registry 'CurrentVersion\\Run	MeshAgent	"\[INSTALLFOLDER\]meshagentw\.exe"	AutostartEntry' \
      "autostart Run value"
    expect Feature '^Autostart	' "Autostart feature"
    expect FeatureComponents '^Autostart	AutostartEntry' "Autostart feature holds its component"
    expect Shortcut 'ProgramMenuFolder	Mesh Agent	.*meshagentw\.exe' "Start menu shortcut"
    expect File '	meshagent\.exe	' "meshagent.exe in the package"
    expect Property '^UpgradeCode	\{?EB4655AF-FEDC-445D-B6E0-C1B908B291E2' "stable UpgradeCode"
    expect Property '^AUTOSTART	1' "AUTOSTART defaults to 1"
    [ "$failures" -eq "$before" ] \
      && ok "meshagent.wxs links into an MSI (wixl): autostart, shortcut, files, upgrade code"
  fi
else
  skip "WiX recipe not linked (wixl, msiinfo)"
fi

# ---------------------------------------------------------------- PowerShell build script
if have pwsh; then
  # shellcheck disable=SC2016 # PowerShell variables, not the shell's
  if pwsh -NoProfile -Command '$e = $null; [System.Management.Automation.Language.Parser]::ParseFile(
    (Resolve-Path "installers/windows/build_msi.ps1"), [ref]$null, [ref]$e) | Out-Null;
    if ($e) { $e; exit 1 }'; then ok "build_msi.ps1 parses"; else bad "build_msi.ps1 does not parse"; fi
else
  skip "build_msi.ps1 not parsed (pwsh)"
fi

if [ "$failures" -gt 0 ]; then
  echo "check_recipes: $failures check(s) failed" >&2
  exit 1
fi
echo "check_recipes: all available checks passed"
