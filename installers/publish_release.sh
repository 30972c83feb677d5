#!/usr/bin/env bash
# Attach the built installers to a tag's release: SHA256SUMS over them, then the GitHub CLI
# creates the release if the tag has none (notes generated from the commits) and uploads.
#
#   installers/publish_release.sh TAG DIR [--dry-run]
#
#   TAG        the release tag (v0.1.0); it must exist on the remote
#   DIR        a folder holding the installers (searched recursively): *.deb *.rpm *.msi *.dmg
#   --dry-run  write DIR/SHA256SUMS and list what would be uploaded; no network, no gh needed
#
# Environment: GH_TOKEN (the workflow's GITHUB_TOKEN, contents: write), GH_REPO if not run
# inside the repository's checkout.
set -euo pipefail

dry_run=0 args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done
[ "${#args[@]}" -eq 2 ] || { echo "usage: publish_release.sh TAG DIR [--dry-run]" >&2; exit 2; }
tag="${args[0]}" dir="${args[1]}"
[ -d "$dir" ] || { echo "publish_release.sh: no folder $dir" >&2; exit 1; }

files=()
while IFS= read -r -d '' file; do files+=("$file"); done < <(
  find "$dir" -type f \( -name '*.deb' -o -name '*.rpm' -o -name '*.msi' -o -name '*.dmg' \) -print0 | sort -z
)
[ "${#files[@]}" -gt 0 ] || { echo "publish_release.sh: no installers under $dir" >&2; exit 1; }

sums="$dir/SHA256SUMS"
: >"$sums"
for file in "${files[@]}"; do
  (cd "$(dirname "$file")" && sha256sum "$(basename "$file")") >>"$sums"
done
echo "== $tag: ${#files[@]} installer(s)"
cat "$sums"

if [ "$dry_run" = 1 ]; then
  echo "dry run: nothing uploaded"
  exit 0
fi
command -v gh >/dev/null || { echo "publish_release.sh: the GitHub CLI (gh) is not installed" >&2; exit 1; }
if ! gh release view "$tag" >/dev/null 2>&1; then
  gh release create "$tag" --verify-tag --title "Mesh Agent ${tag#v}" --generate-notes
fi
gh release upload "$tag" "${files[@]}" "$sums" --clobber
echo "== uploaded to the $tag release"
