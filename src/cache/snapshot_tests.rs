//! Tests of the cache snapshot: format, refusal of corrupt files, restore.

use std::io::Cursor;

use super::*;
use crate::cache::{CacheConfig, Entry};
use crate::dns::{parse_query, parse_response, Query};

fn cache(max_bytes: usize, shards: usize) -> Cache {
    Cache::new(&CacheConfig {
        max_entries: 100_000,
        max_bytes,
        shards,
    })
}

fn question(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = dns::name_from_str(name).expect("name");
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

fn query_packet(name: &str, qtype: u16, dnssec_ok: bool) -> Vec<u8> {
    let mut p = vec![0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(&question(name, qtype));
    if dnssec_ok {
        p[11] = 1;
        dns::push_opt(&mut p, 1232, true, 0);
    }
    p
}

/// An upstream reply (with an OPT record, as upstreams send them), walked by
/// `parse_response` into an entry: `rcode` 0 with `addr` Some is a positive answer (one A
/// record), 0 with None NODATA and 3 NXDOMAIN (both with an SOA in authority).
fn entry(
    name: &str,
    rcode: u8,
    addr: Option<[u8; 4]>,
    ttl: u32,
    key_flags: u8,
    zone: u16,
    stored: Instant,
) -> (Vec<u8>, Entry) {
    let q = question(name, 1);
    let mut w = vec![0x12, 0x34, 0x81, 0x80 | rcode, 0, 1, 0, 0, 0, 0, 0, 1];
    w.extend_from_slice(&q);
    if let Some(a) = addr {
        w[7] = 1;
        w.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        w.extend_from_slice(&ttl.to_be_bytes());
        w.extend_from_slice(&[0, 4]);
        w.extend_from_slice(&a);
    } else {
        w[9] = 1;
        w.extend_from_slice(&[0xC0, 12, 0, 6, 0, 1]);
        w.extend_from_slice(&ttl.to_be_bytes());
        let mut rdata = vec![0u8, 0u8];
        for v in [1u32, 7200, 1800, 86400, ttl] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        w.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        w.extend_from_slice(&rdata);
    }
    dns::push_opt(&mut w, 1232, key_flags & 1 != 0, 0);
    let resp = parse_response(&w, &q).expect("valid reply");
    let e = Entry::new(
        resp.wire,
        resp.ttl_offsets,
        key_flags,
        resp.kind,
        zone,
        stored,
        Duration::from_secs(ttl as u64),
    );
    (q, e)
}

fn put(c: &Cache, (q, e): (Vec<u8>, Entry)) {
    let key = c.key(&q, e.key_flags);
    assert!(c.insert(key, e));
}

/// Looks `name` (type A) up; the rendered reply and the entry's age, kind and zone.
fn hit(
    c: &Cache,
    name: &str,
    dnssec_ok: bool,
    now: Instant,
) -> Option<(Vec<u8>, u32, AnswerKind, u16)> {
    let p = query_packet(name, 1, dnssec_ok);
    let q: Query = parse_query(&p).expect("query");
    let key = c.key(q.question_lower(), q.key_flags());
    c.lookup(key, &q, now, |e, age| {
        let mut out = Vec::new();
        e.render(&q, &p, age, 65535, 1232, &mut out);
        (out, age, e.kind, e.zone)
    })
}

/// The first TTL of a rendered reply (its first record after the question, no OPT).
fn first_ttl(reply: &[u8], name: &str) -> u32 {
    dns::u32_at(reply, DNS_HEADER + question(name, 1).len() + 6)
}

/// A small snapshot of two entries, with the wall time it was written at.
fn small_snapshot() -> (Vec<u8>, Instant, SystemTime) {
    let c = cache(1 << 20, 1);
    let t = Instant::now();
    put(&c, entry("a.example", 0, Some([10, 0, 0, 1]), 30, 0, 0, t));
    put(&c, entry("nx.example", 3, None, 30, 0, 0, t));
    let wall = SystemTime::now();
    let mut buf = Vec::new();
    let stats = c.write_snapshot(&mut buf, t, wall).unwrap();
    assert_eq!(stats.entries, 2);
    assert_eq!(stats.bytes, buf.len() as u64);
    (buf, t, wall)
}

/// Recomputes every chunk CRC and the trailer's CRC after a test edited entry bytes.
fn reseal(buf: &mut [u8]) {
    let mut at = HEADER;
    loop {
        let len = le_u32(buf, at) as usize;
        let count = le_u32(buf, at + 4);
        let crc = crc32fast::hash(&buf[at..at + 8]);
        buf[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
        at += CHUNK_HEADER + len;
        if len == 0 && count == 0 {
            break;
        }
    }
    let crc = crc32fast::hash(&buf[..at + 8]);
    buf[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
}

fn load(c: &Cache, buf: &[u8], t: Instant, wall: SystemTime) -> Result<LoadStats, SnapshotError> {
    c.load_snapshot(&mut Cursor::new(buf), t, wall, 8)
}

#[test]
fn round_trip_keeps_answers_ages_and_absolute_expiry() {
    let old = cache(1 << 20, 4);
    let t = Instant::now();
    let s = |n| Duration::from_secs(n);
    put(
        &old,
        entry("pos.example", 0, Some([10, 0, 0, 1]), 30, 0, 1, t),
    );
    put(
        &old,
        entry("pos.example", 0, Some([10, 0, 0, 2]), 30, 1, 1, t),
    );
    put(&old, entry("nx.example", 3, None, 30, 0, 0, t));
    put(&old, entry("nodata.example", 0, None, 30, 2, 0, t + s(5)));
    put(
        &old,
        entry("gone.example", 0, Some([1, 1, 1, 1]), 5, 0, 0, t),
    );
    put(
        &old,
        entry("ends.example", 0, Some([1, 1, 1, 2]), 11, 0, 0, t),
    );
    put(
        &old,
        entry("zone9.example", 0, Some([1, 1, 1, 3]), 30, 0, 9, t),
    );
    let (q, mut stale) = entry("stale.example", 0, Some([1, 1, 1, 4]), 5, 0, 0, t);
    stale.stale = 60;
    put(&old, (q, stale));

    // Written 10 s after the store; "gone" is past its stale horizon already.
    let wall = SystemTime::now();
    let mut buf = Vec::new();
    let w = old.write_snapshot(&mut buf, t + s(10), wall).unwrap();
    assert_eq!(w.entries, 7);

    // Loaded 2 s later (wall clock) into a new cache: another hasher seed, another epoch.
    let new = cache(1 << 20, 8);
    let now = Instant::now();
    let l = new
        .load_snapshot(&mut Cursor::new(&buf), now, wall + s(2), 2)
        .unwrap();
    assert_eq!(
        (l.entries, l.loaded, l.expired, l.unknown_zone, l.oversized),
        (7, 5, 1, 1, 0),
        "{l:?}"
    );
    assert_eq!(l.bytes, buf.len() as u64);
    assert_eq!(unix_ms(l.created), unix_ms(wall));
    assert_eq!(new.len(), 5, "the stale entry is kept");

    let (r, age, kind, zone) = hit(&new, "pos.example", false, now).expect("pos");
    assert_eq!((age, kind, zone), (12, AnswerKind::Positive, 1));
    assert_eq!(&r[r.len() - 4..], &[10, 0, 0, 1]);
    assert_eq!(first_ttl(&r, "pos.example"), 18);
    let (r, ..) = hit(&new, "pos.example", true, now).expect("DO=1 answer");
    assert_eq!(&r[r.len() - 4 - OPT..r.len() - OPT], &[10, 0, 0, 2]);
    let (r, age, kind, _) = hit(&new, "nx.example", false, now).expect("nx");
    assert_eq!((age, kind), (12, AnswerKind::NxDomain));
    assert_eq!(r[3] & 0xF, 3);
    assert_eq!(first_ttl(&r, "nx.example"), 18);
    // Stored with CD=1 (key flags 2): a plain query misses, as it would have before.
    assert!(hit(&new, "nodata.example", false, now).is_none());
    assert!(
        hit(&new, "stale.example", false, now).is_none(),
        "past its TTL"
    );
    // Absolute expiry: 30 s after the store, 18 s from now.
    assert!(hit(&new, "pos.example", false, now + s(17)).is_some());
    assert!(hit(&new, "pos.example", false, now + s(18)).is_none());

    // A wall clock set back since the write never makes an entry younger.
    let back = cache(1 << 20, 1);
    back.load_snapshot(&mut Cursor::new(&buf), now, wall - s(100), 2)
        .unwrap();
    let (_, age, ..) = hit(&back, "pos.example", false, now).expect("pos");
    assert_eq!(age, 10);

    // Snapshot of the loaded cache: the same entries, absolute times unchanged.
    let mut again = Vec::new();
    let w2 = new.write_snapshot(&mut again, now, wall + s(2)).unwrap();
    assert_eq!(w2.entries, 5);
    let third = cache(1 << 20, 2);
    third
        .load_snapshot(&mut Cursor::new(&again), now, wall + s(2), 2)
        .unwrap();
    let (_, age, ..) = hit(&third, "nx.example", false, now).expect("nx");
    assert_eq!(age, 12);
}

const OPT: usize = dns::OPT_LEN;

#[test]
fn stream_is_read_up_to_its_trailer_only() {
    let (buf, t, wall) = small_snapshot();
    let mut stream = buf.clone();
    stream.extend_from_slice(b"next message");
    let mut r = Cursor::new(&stream);
    let c = cache(1 << 20, 2);
    let l = c.load_snapshot(&mut r, t, wall, 1).unwrap();
    assert_eq!(l.loaded, 2);
    assert_eq!(r.position(), buf.len() as u64);
}

#[test]
fn empty_cache_round_trips() {
    let c = cache(1 << 20, 4);
    let mut buf = Vec::new();
    let w = c
        .write_snapshot(&mut buf, Instant::now(), SystemTime::now())
        .unwrap();
    assert_eq!((w.entries, w.bytes), (0, 44));
    let l = load(&cache(1 << 20, 1), &buf, Instant::now(), SystemTime::now()).unwrap();
    assert_eq!((l.entries, l.loaded), (0, 0));
}

#[test]
fn every_truncation_is_refused() {
    let (buf, t, wall) = small_snapshot();
    let c = cache(1 << 20, 2);
    for n in 0..buf.len() {
        let err = load(&c, &buf[..n], t, wall).unwrap_err();
        assert!(matches!(err, SnapshotError::Truncated), "{n}: {err}");
        assert_eq!(err.label(), "truncated");
    }
    assert!(c.is_empty());
    load(&c, &buf, t, wall).unwrap();
    assert_eq!(c.len(), 2);
}

#[test]
fn every_flipped_bit_is_refused() {
    let (buf, t, wall) = small_snapshot();
    let c = cache(1 << 20, 2);
    for at in 0..buf.len() {
        for bit in 0..8 {
            let mut b = buf.clone();
            b[at] ^= 1 << bit;
            let err = load(&c, &b, t, wall).unwrap_err();
            let ok = match at {
                0..8 => matches!(err, SnapshotError::Foreign),
                8..12 => matches!(err, SnapshotError::UnsupportedVersion(v) if v != VERSION),
                _ => matches!(err, SnapshotError::ChecksumMismatch),
            };
            assert!(ok, "byte {at} bit {bit}: {err}");
        }
    }
    assert!(c.is_empty());
}

#[test]
fn foreign_future_and_oversized_snapshots_are_refused() {
    let (buf, t, wall) = small_snapshot();
    let c = cache(1 << 20, 2);
    let err = load(&c, b"GIF89a, not a snapshot at all", t, wall).unwrap_err();
    assert!(matches!(err, SnapshotError::Foreign));
    assert_eq!(err.label(), "foreign");
    assert!(matches!(
        load(&c, b"NDNS", t, wall),
        Err(SnapshotError::Truncated)
    ));

    let mut next = buf.clone();
    next[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
    reseal(&mut next);
    let err = load(&c, &next, t, wall).unwrap_err();
    assert!(matches!(err, SnapshotError::UnsupportedVersion(2)), "{err}");
    assert_eq!(err.label(), "unsupported_version");
    assert!(err.to_string().contains("version 2"));

    // A full cache's snapshot into a cache with a far smaller budget.
    let big = cache(8 << 20, 4);
    let now = Instant::now();
    for i in 0..20_000u32 {
        let name = format!("n{i}.example");
        put(&big, entry(&name, 0, Some(i.to_be_bytes()), 30, 0, 0, now));
    }
    let mut huge = Vec::new();
    big.write_snapshot(&mut huge, now, wall).unwrap();
    assert!(huge.len() > CHUNK_TARGET, "more than one chunk");
    let same = cache(8 << 20, 2);
    assert_eq!(load(&same, &huge, now, wall).unwrap().loaded, 20_000);
    let (r, ..) = hit(&same, "n19999.example", false, now).expect("last entry");
    assert_eq!(&r[r.len() - 4..], &19_999u32.to_be_bytes());
    let small = cache(64 << 10, 1);
    assert!(huge.len() as u64 > small.snapshot_limit());
    let err = load(&small, &huge, now, wall).unwrap_err();
    assert!(matches!(err, SnapshotError::TooLarge { .. }), "{err}");
    assert_eq!(err.label(), "too_large");

    // A hostile chunk length with a valid chunk CRC is refused before anything is read.
    let mut hostile = buf[..HEADER].to_vec();
    let mut h = [0u8; CHUNK_HEADER];
    h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32fast::hash(&h[..8]);
    h[8..].copy_from_slice(&crc.to_le_bytes());
    hostile.extend_from_slice(&h);
    assert!(matches!(
        load(&small, &hostile, now, wall),
        Err(SnapshotError::TooLarge { .. })
    ));
    assert!(c.is_empty() && small.is_empty());
}

/// Entries whose checksums hold but whose contents do not: each refused with its index and
/// reason, and nothing of the snapshot inserted (the first entry is sound).
#[test]
fn malformed_entries_are_refused_whole() {
    let (buf, t, wall) = small_snapshot();
    // One shard: the entries are in insertion order, the second is the NXDOMAIN.
    // The second entry starts after the first (fixed part + wire + offsets).
    let first = HEADER + CHUNK_HEADER;
    let second = first
        + ENTRY_FIXED
        + le_u16(&buf, first + 20) as usize
        + 2 * le_u16(&buf, first + 22) as usize;
    let wire = second + ENTRY_FIXED;
    type Edit<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
    let cases: Vec<(&str, Edit)> = vec![
        ("key flags out of range", Box::new(|b| b[second + 18] = 4)),
        ("answer kind out of range", Box::new(|b| b[second + 19] = 4)),
        (
            "answer kind does not match the wire",
            Box::new(|b| b[second + 19] = 2),
        ),
        (
            "stale window shorter than the lifetime",
            Box::new(|b| b[second + 12] = 0),
        ),
        (
            "stored after the snapshot was written",
            Box::new(|b| b[second + 7] = 0x7F),
        ),
        ("question not lowercase", Box::new(|b| b[wire + 13] = b'N')),
        (
            "wire is not a DNS response",
            Box::new(|b| b[wire + 2] &= 0x7F),
        ),
        ("truncated answer", Box::new(|b| b[wire + 2] |= 0x02)),
        (
            "TTL offsets do not match the records",
            Box::new(|b| {
                let n = b.len() - CHUNK_HEADER - TRAILER - 2;
                b[n] ^= 1;
            }),
        ),
        ("no question", Box::new(|b| b[wire + 12] = 63)),
        (
            "wire has an OPT record or bytes after its records",
            Box::new(|b| {
                // One more wire byte, taken from the TTL offsets' room: the offsets then run
                // past the chunk, so the entry is also too long for it.
                let len = le_u16(b, second + 20) + 1;
                b[second + 20..second + 22].copy_from_slice(&len.to_le_bytes());
                let n = le_u16(b, second + 22) - 1;
                b[second + 22..second + 24].copy_from_slice(&n.to_le_bytes());
            }),
        ),
        (
            "runs past the end of its chunk",
            Box::new(|b| {
                let n = le_u16(b, second + 22) + 1;
                b[second + 22..second + 24].copy_from_slice(&n.to_le_bytes());
            }),
        ),
    ];
    let c = cache(1 << 20, 2);
    for (reason, edit) in cases {
        let mut b = buf.clone();
        edit(&mut b);
        reseal(&mut b);
        match load(&c, &b, t, wall) {
            Err(SnapshotError::MalformedEntry { index, reason: r }) => {
                assert_eq!((index, r), (1, reason))
            }
            other => panic!("{reason}: {other:?}"),
        }
        assert!(c.is_empty(), "{reason}: nothing inserted");
    }
}

#[test]
fn file_is_written_atomically_and_loaded() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.snapshot");
    let c = cache(1 << 20, 2);
    let none = load_snapshot_file(&c, &path, Instant::now(), SystemTime::now(), 1).unwrap();
    assert!(none.is_none(), "no file: a cold start");

    let t = Instant::now();
    put(&c, entry("a.example", 0, Some([10, 0, 0, 1]), 30, 0, 0, t));
    let wall = SystemTime::now();
    let w = write_snapshot_file(&c, &path, t, wall).unwrap();
    assert_eq!(w.entries, 1);
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), w.bytes);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Written again over the old one; no temporary file left behind.
    put(&c, entry("b.example", 0, Some([10, 0, 0, 2]), 30, 0, 0, t));
    assert_eq!(write_snapshot_file(&c, &path, t, wall).unwrap().entries, 2);
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);

    let fresh = cache(1 << 20, 2);
    let l = load_snapshot_file(&fresh, &path, t, wall, 1)
        .unwrap()
        .expect("loaded");
    assert_eq!(l.loaded, 2);
    assert!(hit(&fresh, "b.example", false, t).is_some());

    // Bytes after the trailer: a damaged file, refused whole.
    let mut b = fs::read(&path).unwrap();
    b.push(0);
    fs::write(&path, &b).unwrap();
    let other = cache(1 << 20, 2);
    let err = load_snapshot_file(&other, &path, t, wall, 1).unwrap_err();
    assert!(matches!(err, SnapshotError::TrailingBytes), "{err}");
    assert!(other.is_empty());
    // A file over the limit is refused by its size, before it is read.
    let small = cache(64 << 10, 1);
    let big = fs::File::create(&path).unwrap();
    big.set_len(small.snapshot_limit() + 1).unwrap();
    let err = load_snapshot_file(&small, &path, t, wall, 1).unwrap_err();
    assert!(matches!(err, SnapshotError::TooLarge { .. }), "{err}");
    // Not a file at all: an I/O error with its own label.
    let err = load_snapshot_file(&small, dir.path(), t, wall, 1).unwrap_err();
    assert_eq!(err.label(), "io", "{err}");
    assert!(small.is_empty());
    // A path whose directory is missing: an I/O error, not a panic.
    let err = write_snapshot_file(&c, &dir.path().join("no/such"), t, wall).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
}

/// A walk one entry per step, with inserts (new names and replacements), evictions and
/// purges between steps: every entry it yields is whole and was live when taken, no name
/// twice; an arena emptied in place ends it.
#[test]
fn walk_survives_changes_between_steps() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut resets, mut freed) = (0, 0);
    for round in 0..50 {
        let c = Cache::new(&CacheConfig {
            max_entries: 60,
            max_bytes: 4000,
            shards: 1,
        });
        let lock = 0;
        let mut t = Instant::now();
        let put_name = |c: &Cache, i: u32, t: Instant, ttl: u32| {
            let name = format!("n{i}.example");
            put(c, entry(&name, 0, Some([round, 0, 0, 1]), ttl, 0, 0, t));
        };
        for i in 0..rng.random_range(0..80) {
            put_name(&c, i, t, rng.random_range(1..30));
        }
        let mut walk = c.read(lock, ShardWalk::new);
        let start = walk.seq;
        let mut seen = std::collections::HashSet::new();
        loop {
            let mut got = Vec::new();
            let more = c.read(lock, |sh| {
                walk.step(sh, 1, |e| {
                    // Live when taken: the table points at it.
                    assert_eq!(
                        sh.find(rd_u64(e, H_KEY)).map(|h| sh.entry(h).as_ptr()),
                        Some(e.as_ptr())
                    );
                    got.push(e.to_vec());
                })
            });
            assert!(got.len() <= 1);
            for e in got {
                // Whole: its key is the hash of its own question.
                let wire = &e[HDR..HDR + rd_u16(&e, H_WIRE) as usize];
                let qend = dns::skip_name(wire, DNS_HEADER).unwrap() + 4;
                let key = c.key(&wire[DNS_HEADER..qend], e[H_FLAGS]);
                assert_eq!(key, rd_u64(&e, H_KEY));
                assert!(seen.insert(key), "round {round}: a name twice");
            }
            if !more {
                break;
            }
            match rng.random_range(0..10) {
                0..=5 => put_name(&c, rng.random_range(0..120), t, rng.random_range(1..30)),
                6 => {
                    t += Duration::from_secs(rng.random_range(0..20));
                    c.purge_expired(t);
                }
                _ => {}
            }
        }
        c.read(lock, |sh| {
            resets += usize::from(sh.resets != walk.resets);
            freed += usize::from(before(start, sh.first_seq));
        });
    }
    assert!(
        resets > 0 && freed > 0,
        "{resets} resets, {freed} with blocks freed"
    );
    // Emptied in place mid-walk: the walk ends, nothing of the new arena is taken.
    let c = cache(1 << 20, 1);
    let lock = 0;
    let t = Instant::now();
    put(&c, entry("a.example", 0, Some([1, 1, 1, 1]), 5, 0, 0, t));
    put(&c, entry("b.example", 0, Some([1, 1, 1, 2]), 5, 0, 0, t));
    let mut walk = c.read(lock, ShardWalk::new);
    let mut n = 0;
    assert!(c.read(lock, |sh| walk.step(sh, 1, |_| n += 1)));
    assert_eq!(c.purge_expired(t + Duration::from_secs(10)), 2);
    put(&c, entry("c.example", 0, Some([1, 1, 1, 3]), 5, 0, 0, t));
    put(&c, entry("d.example", 0, Some([1, 1, 1, 4]), 5, 0, 0, t));
    assert!(!c.read(lock, |sh| walk.step(sh, 1 << 20, |_| n += 1)));
    assert_eq!(n, 1);
}

#[test]
fn smaller_cache_keeps_the_newest_entries() {
    let old = cache(1 << 20, 1);
    let t = Instant::now();
    for i in 0..100u32 {
        let name = format!("n{i}.example");
        let at = t + Duration::from_millis(100 * i as u64);
        put(&old, entry(&name, 0, Some(i.to_be_bytes()), 30, 0, 0, at));
    }
    let wall = SystemTime::now();
    let mut buf = Vec::new();
    old.write_snapshot(&mut buf, t + Duration::from_secs(10), wall)
        .unwrap();
    let small = Cache::new(&CacheConfig {
        max_entries: 10,
        max_bytes: 1 << 20,
        shards: 1,
    });
    let now = Instant::now();
    let l = load(&small, &buf, now, wall).unwrap();
    assert_eq!(l.loaded, 100);
    assert_eq!(small.len(), 10);
    assert!(hit(&small, "n99.example", false, now).is_some());
    assert!(hit(&small, "n90.example", false, now).is_some());
    assert!(hit(&small, "n89.example", false, now).is_none());
}
