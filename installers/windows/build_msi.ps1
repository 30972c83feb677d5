<#
.SYNOPSIS
  Build dist\meshagent (PyInstaller, one folder) and dist\MeshAgent-VERSION-x64.msi (WiX v3).

.DESCRIPTION
  Runs on a Windows x64 machine (e.g. a GitHub windows-2022 runner) from any directory:

    powershell -ExecutionPolicy Bypass -File installers\windows\build_msi.ps1 [-Python py] [-KeepVenv]

  Needs Python >= 3.11 (python.org build) and the WiX Toolset v3 (its installer sets %WIX%;
  or pass -WixBin). A throwaway venv in build\packaging\venv gets the package, its runtime
  dependencies and PyInstaller only. Optional code signing: set MESHAGENT_SIGN_CERT_SHA1 to the
  thumbprint of a certificate in the store and have signtool.exe on PATH.
#>
param(
  [string]$Python = "python",
  [string]$WixBin = $(if ($env:WIX) { Join-Path $env:WIX "bin" } else { "" }),
  [switch]$KeepVenv
)
$ErrorActionPreference = "Stop"

# Invoke-Checked EXE ARGS...: run a program, stop on a non-zero exit code. A simple function
# (no param block), so arguments such as "-m" reach the program untouched.
function Invoke-Checked {
  $Exe, $Rest = $args
  & $Exe @Rest
  if ($LASTEXITCODE -ne 0) { throw "$Exe $($Rest -join ' ') failed with exit code $LASTEXITCODE" }
}

$Root = (Resolve-Path (Join-Path $PSScriptRoot "..\..")).Path
Set-Location $Root
$Build = Join-Path $Root "build\packaging"
$Venv = Join-Path $Build "venv"
$Wix = Join-Path $Build "wix"
$Dist = Join-Path $Root "dist"

if (-not $WixBin -or -not (Test-Path (Join-Path $WixBin "candle.exe"))) {
  throw "WiX Toolset v3 not found: install it (sets %WIX%) or pass -WixBin <folder with candle.exe>"
}

# ---------------------------------------------------------------- throwaway build venv
if (-not $KeepVenv -or -not (Test-Path (Join-Path $Venv "Scripts\python.exe"))) {
  if (Test-Path $Venv) { Remove-Item -Recurse -Force $Venv }
  New-Item -ItemType Directory -Force $Build | Out-Null
  Invoke-Checked $Python -m venv $Venv
  # The desktop app and its Qt join the build as soon as the ui package exists.
  $Target = if (Test-Path "meshagent_gui\ui") { ".[gui]" } else { "." }
  Invoke-Checked (Join-Path $Venv "Scripts\python.exe") -m pip install -q "pyinstaller>=6.10,<7" $Target
} else {
  # A kept venv keeps its dependencies, but the package itself is always the current tree.
  Invoke-Checked (Join-Path $Venv "Scripts\python.exe") -m pip install -q --no-deps --force-reinstall .
}
$VenvPython = Join-Path $Venv "Scripts\python.exe"
$Version = (& $VenvPython -c "import meshagent_gui; print(meshagent_gui.__version__)").Trim()
# MSI versions are three numbers: 1.2.3rc1 -> 1.2.3.
$MsiVersion = ([regex]::Match($Version, '^\d+(\.\d+){0,2}')).Value

# ---------------------------------------------------------------- PyInstaller (one folder)
Invoke-Checked (Join-Path $Venv "Scripts\pyinstaller.exe") --noconfirm --log-level WARN `
  --distpath $Dist --workpath (Join-Path $Build "work-onedir") installers\meshagent.spec
$AppDir = Join-Path $Dist "meshagent"
Invoke-Checked (Join-Path $AppDir "meshagent.exe") --version
if (-not (Test-Path (Join-Path $AppDir "meshagentw.exe"))) { throw "meshagentw.exe missing from $AppDir" }

if ($env:MESHAGENT_SIGN_CERT_SHA1) {
  Invoke-Checked signtool.exe sign /sha1 $env:MESHAGENT_SIGN_CERT_SHA1 /fd SHA256 `
    /tr http://timestamp.digicert.com /td SHA256 `
    (Join-Path $AppDir "meshagent.exe") (Join-Path $AppDir "meshagentw.exe")
}

# ---------------------------------------------------------------- WiX: harvest, compile, link
if (Test-Path $Wix) { Remove-Item -Recurse -Force $Wix }
New-Item -ItemType Directory -Force $Wix | Out-Null
# -ag: component GUIDs derived from the install path (stable across builds, upgrades work).
Invoke-Checked (Join-Path $WixBin "heat.exe") dir $AppDir -nologo -ag -srd -sfrag -sreg -scom `
  -cg AppFiles -dr INSTALLFOLDER -var var.SourceDir -out (Join-Path $Wix "AppFiles.wxs")
$Defines = @(
  "-dVersion=$MsiVersion", "-dSourceDir=$AppDir",
  "-dIconFile=$(Join-Path $Root 'resources\icons\meshagent.ico')",
  "-dLicenseRtf=$(Join-Path $Root 'installers\windows\license.rtf')"
)
foreach ($Source in @("installers\windows\meshagent.wxs", (Join-Path $Wix "AppFiles.wxs"))) {
  $Object = Join-Path $Wix ([IO.Path]::GetFileNameWithoutExtension($Source) + ".wixobj")
  Invoke-Checked (Join-Path $WixBin "candle.exe") -nologo -arch x64 @Defines -out $Object $Source
}
$Msi = Join-Path $Dist "MeshAgent-$Version-x64.msi"
Invoke-Checked (Join-Path $WixBin "light.exe") -nologo -ext WixUIExtension -cultures:en-us `
  -out $Msi (Join-Path $Wix "meshagent.wixobj") (Join-Path $Wix "AppFiles.wixobj")

if ($env:MESHAGENT_SIGN_CERT_SHA1) {
  Invoke-Checked signtool.exe sign /sha1 $env:MESHAGENT_SIGN_CERT_SHA1 /fd SHA256 `
    /tr http://timestamp.digicert.com /td SHA256 $Msi
}
Write-Host "built $Msi"
