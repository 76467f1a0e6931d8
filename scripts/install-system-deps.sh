#!/usr/bin/env bash
# System packages the build and the tests need, installed only when missing (Debian/Ubuntu).
# Building llama-cpp-python needs a C/C++ compiler, make and CMake; the tests need Prometheus and
# headless Chromium with its WebDriver (the live quality page's browser tests).
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
# the metrics tests scrape kvproxy with a real Prometheus server (and check rules with promtool)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
# tests/test_ui.py drives /usr/bin/chromium through /usr/bin/chromedriver (Selenium)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)

[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing system packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    sudo=sudo
else
    sudo=
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
