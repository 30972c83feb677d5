<#
.SYNOPSIS
  Run a built meshagent.exe as a user would: version, a server, a user, an enrolled agent.

.DESCRIPTION
    powershell -ExecutionPolicy Bypass -File installers\windows\smoke_test.ps1 [-Binary dist\meshagent\meshagent.exe]

  The Windows counterpart of installers/smoke_test.sh, shorter: --version; `server add-user`;
  the server on a free port; a one-time join code; `login` of an agent with its own home and
  the file secret store; `doctor --json` (the QUIC engine's native code loads); the server stopped. Everything runs in a
  temp folder that is removed afterwards. Exits non-zero with "smoke test FAILED: <why>".
#>
param([string]$Binary = "dist\meshagent\meshagent.exe")
$ErrorActionPreference = "Stop"

$Root = (Resolve-Path (Join-Path $PSScriptRoot "..\..")).Path
Set-Location $Root
$Bin = (Resolve-Path $Binary).Path
$Work = Join-Path ([System.IO.Path]::GetTempPath()) ("meshagent-smoke-" + [guid]::NewGuid().ToString("N").Substring(0, 8))
New-Item -ItemType Directory -Path $Work | Out-Null
$env:MESHAGENT_SECRET_STORE = "file"
$server = $null

function Fail([string]$Why) { throw "smoke test FAILED: $Why" }
function Ok([string]$What) { Write-Output "ok   $What" }
# Invoke-Meshagent ARGS...: run the binary, stop on a non-zero exit, return its stdout.
function Invoke-Meshagent {
  $out = & $Bin @args 2>> (Join-Path $Work "cli.err")
  if ($LASTEXITCODE -ne 0) { Fail "meshagent $($args -join ' ') exited $LASTEXITCODE" }
  return $out
}

try {
  $version = Invoke-Meshagent --version
  if ($version -notmatch '^meshagent \d+\.\d+') { Fail "unexpected --version output: $version" }
  Ok "--version: $version"

  $data = Join-Path $Work "server"
  "smoke-password-1" | & $Bin server add-user alice --password-stdin --data-dir $data | Out-Null
  if ($LASTEXITCODE -ne 0) { Fail "server add-user exited $LASTEXITCODE" }
  $serverOut = Join-Path $Work "server.out"
  $server = Start-Process -FilePath $Bin -ArgumentList @("server", "--port", "0", "--data-dir", "`"$data`"") `
    -RedirectStandardOutput $serverOut -RedirectStandardError (Join-Path $Work "server.err") `
    -PassThru -NoNewWindow
  $url = $null
  foreach ($attempt in 1..150) {
    if ($server.HasExited) { Fail "the server exited with code $($server.ExitCode)" }
    $match = Select-String -Path $serverOut -Pattern 'listening on (\S+)' -ErrorAction SilentlyContinue
    if ($match) { $url = $match.Matches[0].Groups[1].Value; break }
    Start-Sleep -Milliseconds 200
  }
  if (-not $url) { Fail "the server did not report its address within 30 s" }
  Ok "server listening on $url"

  $code = Invoke-Meshagent server join-code --user alice --data-dir $data
  $home_ = Join-Path $Work "agent"
  Invoke-Meshagent --home $home_ login $url --join-code $code --name smoke-win | Out-Null
  Ok "agent enrolled"
  # doctor runs without a running agent; its exit code reflects that, its report must not break.
  $report = & $Bin --home $home_ doctor --json 2>> (Join-Path $Work "cli.err")
  if (-not ($report -match '"name": "quic engine"')) { Fail "doctor --json reports no QUIC engine: $report" }
  Ok "doctor --json: the QUIC engine loads"

  $errors = Get-ChildItem $Work -Filter *.err | Select-String -Pattern "Traceback"
  if ($errors) { Fail "a traceback was printed: $($errors[0])" }
  Write-Output "smoke test passed ($Bin)"
} finally {
  if ($server -and -not $server.HasExited) { Stop-Process -Id $server.Id -Force }
  Remove-Item -Recurse -Force $Work -ErrorAction SilentlyContinue
}
