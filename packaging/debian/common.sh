# Shared by the maintainer scripts (packaging/build-deb puts it at the top of each).
# Every path goes through $DPKG_ROOT: empty on a real install, the target root when dpkg
# installs into another root with --force-script-chrootless (the package test does).

UNIT=iortd.service
CONFIG=/etc/iortd/iortd.toml
UPGRADE_MARKER=/run/iortd.upgrade-stopped
# How long an upgrade (or a removal) waits for a delivery to end before it leaves the
# running daemon alone; and where the daemon answers (its [health] listen).
WAIT_S=${IORTD_UPGRADE_WAIT_S:-120}
STATUS_URL=${IORTD_STATUS_URL:-http://127.0.0.1:9108/status}

say() {
    echo "iortd: $*" >&2
}

# The installed iortd, run by the venv's interpreter (no reliance on the #! line, so that it
# also works from a root that is not /).
iortd_cmd() {
    "${DPKG_ROOT:-}/opt/iortd/bin/python" "${DPKG_ROOT:-}/opt/iortd/bin/iortd" "$@"
}

systemd_running() {
    [ -d "${DPKG_ROOT:-}/run/systemd/system" ]
}

service_active() {
    systemd_running && systemctl is-active --quiet "$UNIT"
}

# Exit status of `iortd wait-idle`: 0 idle; 1 still delivering at the timeout, or a state
# that cannot be read (then nothing is stopped or restarted). Called only while the service
# is active, so a refused connection is "cannot read" too (--expect-running).
wait_idle() {
    iortd_cmd wait-idle --expect-running --url "$STATUS_URL" --timeout "$WAIT_S" >&2
}

# The unit's LoadCredential=NAME:FILE lines, and those of its drop-ins, as
# --credential NAME:FILE arguments: check-config then checks what the unit will hand over.
credential_args() {
    for f in "${DPKG_ROOT:-}/lib/systemd/system/$UNIT" \
             "${DPKG_ROOT:-}/etc/systemd/system/$UNIT.d/"*.conf; do
        [ -f "$f" ] || continue
        sed -n 's/^[[:space:]]*LoadCredential=\([^:[:space:]]*\):\(.*[^[:space:]]\)[[:space:]]*$/\1 \2/p' "$f"
    done | while read -r name file; do
        if [ -f "${DPKG_ROOT:-}$file" ]; then
            printf '%s\n' "--credential=$name:${DPKG_ROOT:-}$file"
        else
            # systemd would refuse to start the unit; check-config names the key.
            say "missing: $file (the unit's LoadCredential=$name:$file)"
        fi
    done
}

# 0 when the site config passes `iortd check-config` as the unit will run it.
config_ok() {
    out=$(credential_args | {
        set --
        while read -r arg; do set -- "$@" "$arg"; done
        iortd_cmd check-config "$@" "${DPKG_ROOT:-}$CONFIG" 2>&1
    }) && return 0
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    return 1
}
