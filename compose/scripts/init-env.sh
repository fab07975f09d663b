#!/usr/bin/env bash
# Creates compose/.env from compose/.env.example with random secrets; never overwrites a value.
# - compose/.env missing: copy the example, filling every variable of the "generated secrets" block.
# - compose/.env present: keep every value; append variables the example gained since (with a random value
#   when they belong to the generated block), and generate a secret of that block left empty (a copy of the
#   example, `cp .env.example .env`, would otherwise keep every secret empty for good).
# Always leaves compose/.env with mode 600. Usage: init-env.sh [example] [target]
set -euo pipefail

compose_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
example=${1:-$compose_dir/.env.example}
target=${2:-$compose_dir/.env}

random_secret() {
    # 32 alphanumerics (~190 bits): no character needs quoting in .env, YAML, URLs or htpasswd.
    local value
    value=$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32 || true)
    if [ "${#value}" -ne 32 ]; then
        echo "init-env: could not read random bytes from /dev/urandom" >&2
        exit 1
    fi
    printf '%s' "$value"
}

umask 077
created=0
if [ ! -e "$target" ]; then
    : > "$target"
    created=1
fi

appended=()
in_secrets=0
tmp=$(mktemp "${target}.XXXXXX")
trap 'rm -f "$tmp" "$tmp.next"' EXIT
# A copy with Unix line ends (a file saved on Windows ends lines in CR LF: compose would read each value with a
# trailing CR) and a final newline, so appended lines start on a line of their own.
tr -d '\r' < "$target" > "$tmp"
if [ -s "$tmp" ] && [ -n "$(tail -c 1 "$tmp")" ]; then
    echo >> "$tmp"
fi
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        "# >>> generated secrets"*) in_secrets=1 ;;
        "# <<< generated secrets"*) in_secrets=0 ;;
    esac
    if [[ "$line" =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
        name=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        if grep -q "^${name}=" "$tmp"; then
            if [ "$in_secrets" = 1 ] && grep -qx "${name}=" "$tmp"; then
                secret=$(random_secret)  # alphanumerics only, as is the name: safe in the sed expression
                sed "s/^${name}=\$/${name}=${secret}/" "$tmp" > "$tmp.next"  # no sed -i: BSD's (macOS) differs
                mv "$tmp.next" "$tmp"
                appended+=("$name")
            fi
            continue  # a value set by the user or an earlier run: never touched
        fi
        if [ "$in_secrets" = 1 ] && [ -z "$value" ]; then
            value=$(random_secret)
        fi
        printf '%s=%s\n' "$name" "$value" >> "$tmp"
        appended+=("$name")
    elif [ "$created" = 1 ]; then
        printf '%s\n' "$line" >> "$tmp"  # comments and blank lines, on first creation only
    fi
done < "$example"
mv "$tmp" "$target"
trap - EXIT
chmod 600 "$target"

if [ "$created" = 1 ]; then
    echo "init-env: created $target with random secrets (mode 600)"
elif [ "${#appended[@]}" -gt 0 ]; then
    echo "init-env: added to $target: ${appended[*]}"
fi
