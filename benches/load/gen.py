#!/usr/bin/env python3
"""Zones and dnsperf query files for benches/load/run.sh (deterministic: seeded).

usage: gen.py OUTDIR MISS_NAMES

OUTDIR/zones/cluster.local.zone  10,000 svc-S.ns-N.svc.cluster.local A (TTL 30, SOA minimum 30),
                                 kubernetes.default.svc.cluster.local, ns.dns.cluster.local
OUTDIR/zones/example.com.zone    10,000 host-I.example.com A (TTL 300), *.miss.example.com A
OUTDIR/hit.txt                   the 20,000 names above, shuffled (all cacheable, all answered)
OUTDIR/nxhit.txt                 20,000 ndots:5 search-path expansions (NXDOMAIN in cluster.local)
OUTDIR/miss.txt                  MISS_NAMES unique names under the wildcard (every one forwarded)
OUTDIR/cmiss.txt                 MISS_NAMES unique names under *.cmiss.svc.cluster.local (every one
                                 forwarded to the cluster zone's upstream, over pooled TCP)
"""
import os
import random
import sys

out, miss_names = sys.argv[1], int(sys.argv[2])
rng = random.Random(6)
os.makedirs(f"{out}/zones", exist_ok=True)

SVC, NS = 1000, 10  # 10,000 services


def soa(origin, ttl):
    return (f"$ORIGIN {origin}.\n$TTL {ttl}\n"
            f"@ {ttl} IN SOA ns.dns.cluster.local. hostmaster.{origin}. 1 7200 1800 86400 {ttl}\n"
            f"@ {ttl} IN NS ns.dns.cluster.local.\n")


with open(f"{out}/zones/cluster.local.zone", "w") as f:
    f.write(soa("cluster.local", 30))
    f.write("ns.dns 30 IN A 10.96.0.10\nkubernetes.default.svc 30 IN A 10.96.0.1\n")
    for n in range(NS):
        for s in range(SVC):
            f.write(f"svc-{s}.ns-{n}.svc 30 IN A 10.{100 + n}.{s >> 8}.{s & 255}\n")
    f.write("*.cmiss.svc 30 IN A 10.99.0.7\n")

with open(f"{out}/zones/example.com.zone", "w") as f:
    f.write(soa("example.com", 300))
    for i in range(SVC * NS):
        f.write(f"host-{i} 300 IN A 192.0.{(i >> 8) & 255}.{i & 255}\n")
    f.write("*.miss 300 IN A 198.51.100.7\n")

hit = [f"svc-{s}.ns-{n}.svc.cluster.local" for n in range(NS) for s in range(SVC)]
hit += [f"host-{i}.example.com" for i in range(SVC * NS)]
rng.shuffle(hit)
with open(f"{out}/hit.txt", "w") as f:
    f.writelines(f"{name} A\n" for name in hit)

# A pod in namespace ns-N resolving a name with fewer than 5 dots first tries its search path:
# NAME.ns-N.svc.cluster.local, NAME.svc.cluster.local, NAME.cluster.local -- all NXDOMAIN.
nx = set()
while len(nx) < 20_000:
    n = rng.randrange(NS)
    base = rng.choice((f"svc-{rng.randrange(SVC)}.ns-{rng.randrange(NS)}.svc",
                       f"host-{rng.randrange(SVC * NS)}.example.com", f"api{rng.randrange(500)}.github.com"))
    for suffix in (f"ns-{n}.svc.cluster.local", "svc.cluster.local", "cluster.local"):
        nx.add(f"{base}.{suffix}")
nx = sorted(nx)[:20_000]
rng.shuffle(nx)
with open(f"{out}/nxhit.txt", "w") as f:
    f.writelines(f"{name} A\n" for name in nx)

with open(f"{out}/miss.txt", "w") as f:
    tag = rng.getrandbits(32)
    f.writelines(f"m{i}-{tag:08x}.miss.example.com A\n" for i in range(miss_names))

with open(f"{out}/cmiss.txt", "w") as f:
    tag = rng.getrandbits(32)
    f.writelines(f"c{i}-{tag:08x}.cmiss.svc.cluster.local A\n" for i in range(miss_names))
