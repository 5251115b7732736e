#!/bin/sh
# Assemble the nodedns runtime root filesystem in ROOTDIR: the nodedns binary,
# the iptables (nft and legacy backends) and nft tools its node setup runs, the
# shared libraries and xtables modules those need, and a few files from /etc.
# Nothing else: no shell, no package manager.
#
# The Dockerfile runs this in a debian:bookworm-slim stage and copies ROOTDIR
# into a scratch image. tests/deploy/test_image.py runs the same script on this
# Debian 12 machine and then starts nodedns chrooted into ROOTDIR, which is how
# the image's content is proven without a container engine.
#
# Usage: stage-rootfs.sh NODEDNS_BINARY ROOTDIR
#        stage-rootfs.sh --no-firewall BINARY ROOTDIR
# The second form stages the admission webhook's image (nodedns-inject): the
# binary under its own name, its libraries and the users; no firewall tools.
set -eu

firewall=true
if [ "$1" = --no-firewall ]; then
    firewall=false
    shift
fi
bin=$1
root=$2

# Merged /usr, as in Debian 12: the loader path /lib64/ld-linux-x86-64.so.2 and
# the /lib/<triplet>/ paths ldd prints resolve inside ROOTDIR.
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/lib64" \
    "$root/etc" "$root/tmp" "$root/run" "$root/var" "$root/proc" "$root/sys" "$root/dev"
for d in bin sbin lib lib64; do
    [ -L "$root/$d" ] || ln -s "usr/$d" "$root/$d"
done
[ -L "$root/var/run" ] || ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"

# copy_file PATH: copy PATH's target to the same place under ROOTDIR, and keep
# PATH itself as a symlink to it when PATH is a symlink (library sonames).
copy_file() {
    real=$(readlink -f "$1")
    mkdir -p "$root$(dirname "$real")"
    [ -e "$root$real" ] || cp "$real" "$root$real"
    if [ "$1" != "$real" ] && [ ! -L "$root$1" ] && [ ! -e "$root$1" ]; then
        mkdir -p "$root$(dirname "$1")"
        ln -s "$real" "$root$1"
    fi
}

# copy_libs ELF...: every shared library the dynamic loader resolves for each
# ELF file, the loader included (ldd's "=> /path" and bare "/path" forms).
copy_libs() {
    for elf in "$@"; do
        ldd "$elf" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
    done | sort -u | while read -r lib; do
        copy_file "$lib"
    done
}

if [ "$firewall" = false ]; then
    name=$(basename "$bin")
    install -m 0755 "$bin" "$root/usr/bin/$name"
    copy_libs "$root/usr/bin/$name"
else
    install -m 0755 "$bin" "$root/usr/bin/nodedns"

    # Firewall tools. The "iptables" name points to the nft backend, as on Debian
    # 12 and most current distributions; the -legacy names stay available.
    cp "$(readlink -f /usr/sbin/xtables-nft-multi)" "$root/usr/sbin/xtables-nft-multi"
    cp "$(readlink -f /usr/sbin/xtables-legacy-multi)" "$root/usr/sbin/xtables-legacy-multi"
    cp "$(readlink -f /usr/sbin/nft)" "$root/usr/sbin/nft"
    for fam in iptables ip6tables; do
        for suffix in "" -save -restore; do
            ln -sf xtables-nft-multi "$root/usr/sbin/$fam$suffix"
            ln -sf xtables-nft-multi "$root/usr/sbin/$fam-nft$suffix"
            ln -sf xtables-legacy-multi "$root/usr/sbin/$fam-legacy$suffix"
        done
    done

    # xtables match/target modules (comment, udp, tcp, NOTRACK, CT, ...) are
    # dlopen()ed by iptables, so ldd on the binaries does not list them.
    xtdir=$(ls -d /usr/lib/*-linux-gnu/xtables | head -n 1)
    mkdir -p "$root$xtdir"
    cp "$xtdir"/*.so "$root$xtdir/"

    copy_libs "$root/usr/bin/nodedns" \
        "$root/usr/sbin/xtables-nft-multi" "$root/usr/sbin/xtables-legacy-multi" \
        "$root/usr/sbin/nft" "$root$xtdir"/*.so
fi

# Name databases iptables and nft consult (protocol and service names), and the
# users: root for the DaemonSet (see deploy/base/daemonset.yaml), 65532 as the
# image's default non-root user.
for f in /etc/protocols /etc/services /etc/ethertypes; do
    [ -e "$f" ] && cp "$f" "$root$f"
done
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
nonroot:x:65532:
GROUP
cat > "$root/etc/nsswitch.conf" <<'NSS'
hosts: files dns
protocols: files
services: files
NSS
