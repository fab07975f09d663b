# Helpers shared by the stack's host-side scripts (sourced, not run).

env_get() {  # env_get FILE NAME [DEFAULT]: the last NAME=value in FILE, else DEFAULT
    local value
    value=$(sed -n "s/^$2=//p" "$1" 2>/dev/null | tail -n 1)
    printf '%s' "${value:-${3:-}}"
}

version_before() {  # version_before VERSION MAJOR MINOR: is VERSION ("v" prefix allowed) older? Unparsable: no
    local v=${1#v} major minor
    major=${v%%.*}
    minor=${v#*.}
    minor=${minor%%.*}
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    (( major < $2 || (major == $2 && minor < $3) ))
}
