#!/usr/bin/env bash
# Development PKI for the fleet's Mosquitto broker (see README.md in this folder):
#
#   make-certs.sh OUT_DIR [DEVICE_ID ...]
#
# In OUT_DIR: a CA (ca.pem, ca.key; created once, reused on later runs so more devices can be
# added), the broker's server certificate (broker.pem, broker.key; SAN localhost, 127.0.0.1
# and $BROKER_HOSTS if set, e.g. BROKER_HOSTS="DNS:broker.plant.example,IP:10.0.0.5"), the
# fleet server's client certificate (fleet-server.pem/.key, CN fleet-server) and one client
# certificate per device (DEVICE_ID.pem/.key, CN DEVICE_ID: the broker takes the CN as the
# MQTT username and the ACL gives that username the device's own topics only).
# Keys are EC P-256, certificates valid $DAYS days (default 825). Existing leaf
# certificates are replaced; the CA is not.
# For development and tests: in production use your own CA (README.md).
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    [ $# -ge 1 ] && exit 0
    exit 64
fi
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 69; }

out=$1
shift
days=${DAYS:-825}
# The device ids the agent accepts (shared::wire::valid_device_id): letters, digits, '.', '_',
# '-', at most 128 characters, not starting with '.'. This also keeps MQTT wildcards ('+',
# '#') and '/' out of the ACL's %u. "fleet-server" is the fleet's own identity.
for id in "$@"; do
    if ! [[ $id =~ ^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$ ]]; then
        echo "make-certs.sh: device id '$id': use letters, digits, '.', '_', '-' (at most 128, not starting with '.')" >&2
        exit 65
    fi
    case $id in
    fleet-server)
        echo "make-certs.sh: device id 'fleet-server' is the fleet server's identity (full access): choose another" >&2
        exit 65 ;;
    ca | broker)
        echo "make-certs.sh: device id '$id' would overwrite $id.pem (the ${id/ca/CA}'s certificate): choose another" >&2
        exit 65 ;;
    esac
done

mkdir -p "$out"
cd "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

if [ ! -f ca.pem ] || [ ! -f ca.key ]; then
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days "$days" \
        -subj "/O=edge fleet/CN=edge fleet dev CA" \
        -addext "basicConstraints=critical,CA:true,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    echo "created CA $out/ca.pem"
fi

# issue NAME CN EXTFILE: NAME.key + NAME.pem signed by the CA
issue() {
    local name=$1 cn=$2 ext=$3
    openssl req "${ec[@]}" -keyout "$tmp/$name.key" -out "$tmp/$name.csr" \
        -subj "/O=edge fleet/CN=$cn" 2>/dev/null
    openssl x509 -req -in "$tmp/$name.csr" -CA ca.pem -CAkey ca.key \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
        -extfile "$ext" -out "$tmp/$name.pem" 2>/dev/null
    mv -f "$tmp/$name.key" "$name.key"
    mv -f "$tmp/$name.pem" "$name.pem"
    echo "issued $out/$name.pem (CN $cn)"
}

cat >"$tmp/server.ext" <<EXT
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1${BROKER_HOSTS:+,$BROKER_HOSTS}
EXT
cat >"$tmp/client.ext" <<'EXT'
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EXT

issue broker localhost "$tmp/server.ext"
issue fleet-server fleet-server "$tmp/client.ext"
for id in "$@"; do
    issue "$id" "$id" "$tmp/client.ext"
done
# certificates are public; keys stay private (0600)
chmod 644 ./*.pem
