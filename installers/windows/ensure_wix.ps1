<#
.SYNOPSIS
  Make sure WiX Toolset v3 is installed (build_msi.ps1 needs candle, light and heat).

.DESCRIPTION
    powershell -ExecutionPolicy Bypass -File installers\windows\ensure_wix.ps1

  Does nothing when %WIX% points at a WiX v3 (GitHub's windows-2022 image has one); otherwise
  installs wixtoolset 3.14 with Chocolatey and, under GitHub Actions, exports WIX for later steps.
#>
$ErrorActionPreference = "Stop"
if ($env:WIX -and (Test-Path (Join-Path $env:WIX "bin\candle.exe"))) {
  Write-Output "WiX v3 at $env:WIX"
  exit 0
}
choco install wixtoolset --version 3.14.1 --no-progress -y
if ($LASTEXITCODE -ne 0) { throw "choco install wixtoolset failed with exit code $LASTEXITCODE" }
$wix = Get-ChildItem "${env:ProgramFiles(x86)}" -Directory -Filter "WiX Toolset v3*" | Select-Object -First 1
if (-not $wix) { throw "WiX v3 was installed but its folder was not found" }
$env:WIX = $wix.FullName + "\"
if ($env:GITHUB_ENV) { "WIX=$($env:WIX)" | Out-File -FilePath $env:GITHUB_ENV -Append -Encoding utf8 }
Write-Output "WiX v3 at $env:WIX"
