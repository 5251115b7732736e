#!/bin/sh
# TLS for the nodedns inject webhook without cert-manager: make a CA of its
# own and a serving certificate for the webhook Service with openssl, then
# (with --apply) store them in the Secret the Deployment mounts and put the CA
# into the MutatingWebhookConfiguration's caBundle.
#
#   deploy/webhook/gen-certs.sh --out DIR             # files only
#   deploy/webhook/gen-certs.sh --out DIR --apply     # and the Secret and caBundle (kubectl)
#
# Options: --namespace NS (kube-system), --service NAME (nodedns-inject),
# --days N (validity of the serving certificate, 365). Rerun it before the
# serving certificate expires: the running webhook picks the new Secret up
# without a restart. The CA key stays in DIR (ca.key): keep it or delete it;
# a rerun with the same DIR reuses the CA, so the caBundle stays valid.
# Needs openssl (1.1.1 or later) and, for --apply, kubectl.
set -eu

ns=kube-system
svc=nodedns-inject
days=365
out=
apply=false
while [ $# -gt 0 ]; do
    case $1 in
        --namespace) ns=$2; shift 2 ;;
        --service) svc=$2; shift 2 ;;
        --days) days=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --apply) apply=true; shift ;;
        *) echo "gen-certs.sh: unknown argument $1" >&2; exit 64 ;;
    esac
done
[ -n "$out" ] || { echo "gen-certs.sh: --out DIR is required" >&2; exit 64; }
command -v openssl >/dev/null || { echo "gen-certs.sh: openssl is not installed" >&2; exit 69; }
mkdir -p "$out"
umask 077

# The CA: 10 years, EC P-256, reused when DIR already holds one.
if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$out/ca.key"
    openssl req -x509 -new -key "$out/ca.key" -sha256 -days 3650 \
        -subj "/CN=${svc}-ca" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$out/ca.crt"
fi

# The serving certificate for the names the API server uses for the Service.
openssl ecparam -name prime256v1 -genkey -noout -out "$out/tls.key.ec"
openssl pkcs8 -topk8 -nocrypt -in "$out/tls.key.ec" -out "$out/tls.key"
rm -f "$out/tls.key.ec"
openssl req -new -key "$out/tls.key" -subj "/CN=${svc}.${ns}.svc" -out "$out/tls.csr"
cat > "$out/tls.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:${svc}.${ns}.svc,DNS:${svc}.${ns}.svc.cluster.local
EXT
openssl x509 -req -in "$out/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -sha256 -days "$days" -extfile "$out/tls.ext" -out "$out/tls.crt" 2>/dev/null
rm -f "$out/tls.csr" "$out/tls.ext"
echo "gen-certs.sh: wrote $out/ca.crt, $out/tls.crt and $out/tls.key for ${svc}.${ns}.svc" >&2

ca_bundle=$(base64 < "$out/ca.crt" | tr -d '\n')
if [ "$apply" = true ]; then
    command -v kubectl >/dev/null || { echo "gen-certs.sh: kubectl is not installed" >&2; exit 69; }
    kubectl -n "$ns" create secret tls "${svc}-tls" --cert="$out/tls.crt" --key="$out/tls.key" \
        --dry-run=client -o yaml | kubectl apply -f -
    kubectl patch mutatingwebhookconfiguration "$svc" --type=json \
        -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"${ca_bundle}\"}]"
else
    echo "gen-certs.sh: to install them:" >&2
    echo "  kubectl -n $ns create secret tls ${svc}-tls --cert=$out/tls.crt --key=$out/tls.key" >&2
    echo "  kubectl patch mutatingwebhookconfiguration $svc --type=json -p '[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"<base64 of $out/ca.crt>\"}]'" >&2
fi
