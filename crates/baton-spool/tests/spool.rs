//! The spool on a real file system: commit, recover, torn tails, large bodies, group commit.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};

use baton_spool::{
    Attempt, BodyLocation, Envelope, MessageMeta, Notify, RcptState, Recipient, RecipientUpdate,
    Spool, SpoolOptions,
};

fn envelope(spool: &Spool, size: u64) -> Envelope {
    Envelope {
        id: spool.next_id(),
        sender: "a@example.com".into(),
        recipients: vec![Recipient::new(
            "b@example.net".into(),
            Some("b@example.net".into()),
            Notify::FAILURE,
        )],
        dsn_ret: None,
        dsn_envid: Some("env1".into()),
        eight_bit: true,
        smtputf8: false,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: "client.example".into(),
        arrived_ms: 1,
        size,
        meta: MessageMeta::default(),
    }
}

async fn store(spool: &Spool, body: &[u8]) -> Envelope {
    let env = envelope(spool, body.len() as u64);
    let mut w = spool.body_writer(env.id);
    // Feed in pieces, as a session does.
    for chunk in body.chunks(7919) {
        w.buf().extend_from_slice(chunk);
        w.settle().await.unwrap();
    }
    spool.commit(&env, w).await.unwrap();
    env
}

#[tokio::test]
async fn committed_messages_are_recovered_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let small = b"Subject: hi\r\n\r\nbody\r\n".to_vec();
    let large: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let (e1, e2) = {
        let (spool, rec) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert!(rec.messages.is_empty());
        (store(&spool, &small).await, store(&spool, &large).await)
    };
    let (spool, rec) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(rec.messages.len(), 2);
    assert_eq!(rec.messages[0].envelope, e1);
    assert_eq!(rec.messages[1].envelope, e2);
    assert!(matches!(rec.messages[0].body, BodyLocation::Inline { .. }));
    assert_eq!(rec.messages[1].body, BodyLocation::File);
    assert_eq!(
        Spool::read_body(dir.path(), &rec.messages[0]).unwrap(),
        small
    );
    assert_eq!(
        Spool::read_body(dir.path(), &rec.messages[1]).unwrap(),
        large
    );
    // New ids continue after the recovered ones.
    assert!(spool.next_id() > e2.id);
}

#[tokio::test]
async fn torn_tail_is_cut_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        store(&spool, b"one\r\n").await;
    }
    let seg = dir.path().join("journal/0000000001.log");
    let good_len = std::fs::metadata(&seg).unwrap().len();
    // A crash mid-write leaves half a frame.
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9])
        .unwrap();
    {
        let (spool, rec) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(rec.messages.len(), 1);
        assert_eq!(rec.truncated_bytes, 11);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
        store(&spool, b"two\r\n").await;
    }
    let (_, rec) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(rec.messages.len(), 2);
    assert_eq!(
        Spool::read_body(dir.path(), &rec.messages[1]).unwrap(),
        b"two\r\n"
    );
}

#[tokio::test]
async fn corrupt_record_is_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        store(&spool, b"one\r\n").await;
        store(&spool, b"two\r\n").await;
    }
    let seg = dir.path().join("journal/0000000001.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0xff; // flip a body byte of the second record
    std::fs::write(&seg, &bytes).unwrap();
    let (_, rec) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(rec.messages.len(), 1);
}

#[tokio::test]
async fn uncommitted_large_body_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    let env = envelope(&spool, 0);
    let mut w = spool.body_writer(env.id);
    w.buf().resize(1 << 20, b'x');
    w.settle().await.unwrap();
    let path = dir.path().join("bodies").join(env.id.to_string());
    assert!(path.exists());
    drop(w); // transaction aborted
    assert!(!path.exists());
    // A body file left by a crash is removed at recovery.
    std::fs::write(dir.path().join("bodies/00000000DEADBEEF"), b"x").unwrap();
    drop(spool);
    let (_, rec) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(rec.orphan_bodies_removed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_rotate_segments_and_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let options = SpoolOptions {
        segment_size: 64 << 10,
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(dir.path(), options.clone()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..50u32 {
                let body = format!("task {t} message {i}\r\n").repeat(20);
                ids.push((store(&spool, body.as_bytes()).await.id, body));
            }
            ids
        }));
    }
    let mut expected = Vec::new();
    for t in tasks {
        expected.extend(t.await.unwrap());
    }
    drop(spool);
    let segments = std::fs::read_dir(dir.path().join("journal"))
        .unwrap()
        .count();
    assert!(
        segments > 1,
        "expected rotation, found {segments} segment(s)"
    );
    let (_, rec) = Spool::open(dir.path(), options).unwrap();
    assert_eq!(rec.messages.len(), expected.len());
    for (id, body) in expected {
        let m = rec.messages.iter().find(|m| m.envelope.id == id).unwrap();
        assert_eq!(Spool::read_body(dir.path(), m).unwrap(), body.as_bytes());
    }
}

/// A rotation that failed half-way (ENOSPC or EIO while writing the new segment's header, or a
/// crash then) leaves a file with no record in it; the next rotation must get past it, not
/// refuse every later message on EEXIST.
#[tokio::test]
async fn a_half_made_segment_does_not_block_rotation() {
    for leftover in [
        &b""[..],
        &b"BATO"[..],
        &baton_spool_magic()[..],
        &b"BATONJ3\n"[..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions {
            segment_size: 1,
            ..SpoolOptions::default()
        };
        let (spool, _) = Spool::open(dir.path(), options.clone()).unwrap();
        let first = store(&spool, b"first\r\n").await;
        // The segment a rotation would create next, as a failed one left it.
        let journal = dir.path().join("journal");
        let last = std::fs::read_dir(&journal)
            .unwrap()
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".log")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap();
        std::fs::write(journal.join(format!("{:010}.log", last + 1)), leftover).unwrap();
        let env = envelope(&spool, 8);
        let mut w = spool.body_writer(env.id);
        w.buf().extend_from_slice(b"second\r\n");
        spool
            .commit(&env, w)
            .await
            .unwrap_or_else(|e| panic!("leftover {leftover:?}: {e}"));
        drop(spool);
        let (_, rec) = Spool::open(dir.path(), options).unwrap();
        let ids: Vec<_> = rec.messages.iter().map(|m| m.envelope.id).collect();
        assert_eq!(ids, [first.id, env.id], "leftover {leftover:?}");
    }
}

/// The segment header as the journal writes it.
fn baton_spool_magic() -> Vec<u8> {
    b"BATONJ4\n".to_vec()
}

/// A finished message's body file goes only once its done record is on disk: deleted before,
/// a power cut would bring the message back pointing at a missing body.
#[tokio::test]
async fn a_body_outlives_its_unsynced_done_record() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    let big = store(&spool, &vec![b'B'; 400 << 10]).await;
    let body = dir.path().join("bodies").join(big.id.to_string());
    assert!(body.exists());
    // A done record alone is not fsynced at once (it rides with the next commit, or the
    // committer syncs it within a second).
    spool.record(&[], &[big.id]).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(body.exists(), "deleted before its done record was durable");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(!body.exists(), "deleted once the record was synced");
}

#[tokio::test]
async fn updates_and_done_records_survive_and_finished_segments_go() {
    let dir = tempfile::tempdir().unwrap();
    let options = SpoolOptions {
        segment_size: 4 << 10,
        ..SpoolOptions::default()
    };
    let large: Vec<u8> = vec![b'L'; 400 << 10];
    let (kept, finished_large) = {
        let (spool, _) = Spool::open(dir.path(), options.clone()).unwrap();
        let mut envs = Vec::new();
        for i in 0..20 {
            envs.push(store(&spool, format!("message {i}\r\n").repeat(40).as_bytes()).await);
        }
        let big = store(&spool, &large).await;
        let attempt = Attempt {
            at_ms: 5,
            code: 451,
            status: "4.3.0".into(),
            diagnostic: "try later".into(),
            remote_mta: Some("mx.example.net".into()),
        };
        // The first message is deferred once; all others but the last finish.
        spool
            .record(
                &[RecipientUpdate {
                    id: envs[0].id,
                    rcpt: 0,
                    state: RcptState::Deferred,
                    attempt: Some(attempt.clone()),
                    next_attempt_ms: 99,
                    delay_notified: false,
                }],
                &[],
            )
            .unwrap();
        let done: Vec<_> = envs[1..19].iter().map(|e| e.id).chain([big.id]).collect();
        spool.record(&[], &done).unwrap();
        // A commit after the records makes sure they were written.
        store(&spool, b"last\r\n").await;
        assert!(!dir.path().join("bodies").join(big.id.to_string()).exists());
        (vec![envs[0].id, envs[19].id], big.id)
    };
    let (_, rec) = Spool::open(dir.path(), options).unwrap();
    let ids: Vec<_> = rec.messages.iter().map(|m| m.envelope.id).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(&ids[..2], kept.as_slice());
    assert!(!ids.contains(&finished_large));
    let first = &rec.messages[0].envelope.recipients[0];
    assert_eq!(first.state, RcptState::Deferred);
    assert_eq!(first.attempts.len(), 1);
    assert_eq!(first.attempts[0].code, 451);
    assert_eq!(first.next_attempt_ms, 99);
    // The finished segments are gone: the first message was copied forward out of segment 1
    // (compaction) or segment 1 is still there for it.
    let segments = baton_spool::journal::list_segments(&dir.path().join("journal")).unwrap();
    let first_segment = match rec.messages[0].body {
        BodyLocation::Inline { segment, .. } => segment,
        BodyLocation::File => panic!("small body in a file"),
    };
    assert_eq!(segments[0], first_segment.min(segments[0]));
    assert!(segments.len() <= 3, "{segments:?}");
    assert_eq!(
        Spool::read_body(dir.path(), &rec.messages[0]).unwrap(),
        "message 0\r\n".repeat(40).into_bytes()
    );
}

#[tokio::test]
async fn head_segments_are_deleted_once_all_their_messages_finish() {
    let dir = tempfile::tempdir().unwrap();
    let options = SpoolOptions {
        segment_size: 2 << 10,
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(dir.path(), options.clone()).unwrap();
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            store(&spool, format!("m{i}\r\n").repeat(100).as_bytes())
                .await
                .id,
        );
    }
    let before = std::fs::read_dir(dir.path().join("journal"))
        .unwrap()
        .count();
    assert!(before > 5);
    spool.record(&[], &ids).unwrap();
    store(&spool, b"flush\r\n").await;
    let after = std::fs::read_dir(dir.path().join("journal"))
        .unwrap()
        .count();
    assert!(after <= 2, "{before} segments before, {after} after");
    drop(spool);
    let (_, rec) = Spool::open(dir.path(), options).unwrap();
    assert_eq!(rec.messages.len(), 1);
}

/// Every meta field survives a restart, and a meta record replaces what the envelope had.
#[tokio::test]
async fn typed_meta_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let meta = MessageMeta {
        send_at_ms: Some(1_767_258_000_000),
        window: Some("Mon-Fri 09:00-17:00 Europe/Berlin".into()),
        tenant: Some("acme".into()),
        campaign: Some("winter".into()),
        pool: None,
        hold: false,
        strip_baton_headers: true,
    };
    let (first, second) = {
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let mut first = envelope(&spool, 5);
        first.meta = meta.clone();
        first.recipients[0].notify = Notify::SUCCESS | Notify::DELAY;
        let w = {
            let mut w = spool.body_writer(first.id);
            w.buf().extend_from_slice(b"one\r\n");
            w
        };
        spool.commit(&first, w).await.unwrap();
        let second = store(&spool, b"two\r\n").await;
        // Held and rebound: the meta record replaces the whole meta.
        first.meta.hold = true;
        first.meta.pool = Some("bulk".into());
        spool.record_meta(first.id, &first.meta).unwrap();
        store(&spool, b"three\r\n").await;
        (first, second)
    };
    let seg = std::fs::read(dir.path().join("journal/0000000001.log")).unwrap();
    assert_eq!(&seg[..8], b"BATONJ4\n");
    let (_, rec) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(rec.messages.len(), 3);
    assert_eq!(rec.messages[0].envelope, first);
    assert!(rec.messages[0].envelope.meta.hold);
    assert_eq!(rec.messages[0].envelope.meta.pool.as_deref(), Some("bulk"));
    assert_eq!(rec.messages[0].envelope.recipients[0].notify.bits(), 2 | 8);
    assert_eq!(rec.messages[1].envelope, second);
    assert_eq!(rec.messages[1].envelope.meta, MessageMeta::default());
    let read = Spool::read_only(dir.path()).unwrap();
    assert_eq!(read[0].envelope, first);
}

/// A spool written before typed meta (segment magic `BATONJ3`, envelope format 1 with meta as
/// string pairs, kind 5 meta records) loads into the typed struct; new records go to a new
/// segment and the old one is never appended to.
#[tokio::test]
async fn a_format_1_spool_loads_into_typed_meta() {
    use serde::Serialize;

    // The records exactly as format 1 laid them out (postcard, fields in this order).
    #[derive(Serialize)]
    struct OldAttempt {
        at_ms: u64,
        code: u16,
        status: String,
        diagnostic: String,
        remote_mta: Option<String>,
    }
    #[derive(Serialize)]
    enum OldState {
        Queued,
        Deferred,
    }
    #[derive(Serialize)]
    struct OldRecipient {
        address: String,
        orcpt: Option<String>,
        notify: u8,
        state: OldState,
        attempts: Vec<OldAttempt>,
        next_attempt_ms: u64,
        delay_notified: bool,
    }
    #[derive(Serialize)]
    enum OldRet {
        #[allow(dead_code)]
        Full,
        Headers,
    }
    #[derive(Serialize)]
    struct OldEnvelope {
        id: u64,
        sender: String,
        recipients: Vec<OldRecipient>,
        dsn_ret: Option<OldRet>,
        dsn_envid: Option<String>,
        eight_bit: bool,
        smtputf8: bool,
        client_ip: IpAddr,
        helo: String,
        arrived_ms: u64,
        size: u64,
        meta: Vec<(String, String)>,
    }
    fn frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
        let mut framed = vec![kind];
        framed.extend_from_slice(payload);
        out.extend_from_slice(&(framed.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&framed).to_le_bytes());
        out.extend_from_slice(&framed);
    }
    fn message(kind: u8, envelope: &OldEnvelope, body: &[u8], out: &mut Vec<u8>) {
        let env = postcard::to_stdvec(envelope).unwrap();
        let mut payload = (env.len() as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&env);
        payload.extend_from_slice(body);
        frame(kind, &payload, out);
    }
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let old = |id: u64, notify: u8, meta: Vec<(String, String)>| OldEnvelope {
        id,
        sender: "a@example.com".into(),
        recipients: vec![OldRecipient {
            address: "b@example.net".into(),
            orcpt: Some("b@example.net".into()),
            notify,
            state: OldState::Queued,
            attempts: Vec::new(),
            next_attempt_ms: 0,
            delay_notified: false,
        }],
        dsn_ret: Some(OldRet::Headers),
        dsn_envid: Some("env1".into()),
        eight_bit: true,
        smtputf8: false,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: "client.example".into(),
        arrived_ms: 1,
        size: 5,
        meta,
    };
    let (scheduled, tagged, held, finished) = (0x100_0001u64, 0x100_0002, 0x100_0003, 0x100_0004);
    let mut seg = b"BATONJ3\n".to_vec();
    message(
        1,
        &old(
            scheduled,
            2 | 8,
            pairs(&[
                ("send_at", "1767258000000"),
                ("window", "Mon-Fri 09:00-17:00 Europe/Berlin"),
                ("tenant", "acme"),
                ("baton-headers", "strip"),
            ]),
        ),
        b"one\r\n",
        &mut seg,
    );
    message(
        2,
        &old(
            tagged,
            0,
            pairs(&[("tenant", "acme"), ("pool", "bulk"), ("campaign", "winter")]),
        ),
        b"",
        &mut seg,
    );
    message(1, &old(held, 1, Vec::new()), b"three\r\n", &mut seg);
    message(1, &old(finished, 0, Vec::new()), b"four\r\n", &mut seg);
    // Format 1 meta records: held, rebound, released (""), held again.
    for (id, key, value) in [
        (held, "hold", "1"),
        (tagged, "pool", "transactional"),
        (tagged, "hold", "1"),
        (tagged, "hold", ""),
    ] {
        frame(
            5,
            &postcard::to_stdvec(&(id, key, value)).unwrap(),
            &mut seg,
        );
    }
    frame(
        3,
        &postcard::to_stdvec(&(
            scheduled,
            0u32,
            OldState::Deferred,
            Some(OldAttempt {
                at_ms: 5,
                code: 451,
                status: "4.3.0".into(),
                diagnostic: "try later".into(),
                remote_mta: None,
            }),
            1_767_258_000_000u64,
            false,
        ))
        .unwrap(),
        &mut seg,
    );
    frame(4, &finished.to_le_bytes(), &mut seg);
    let journal = dir_with_journal();
    let dir = journal.path();
    std::fs::write(dir.join("journal/0000000001.log"), &seg).unwrap();
    std::fs::write(
        dir.join("bodies").join(format!("{tagged:016X}")),
        b"two\r\n",
    )
    .unwrap();

    let check = |messages: &[baton_spool::StoredMessage]| {
        let ids: Vec<u64> = messages.iter().map(|m| m.envelope.id.0).collect();
        assert_eq!(ids, [scheduled, tagged, held]);
        let s = &messages[0].envelope;
        assert_eq!(
            s.meta,
            MessageMeta {
                send_at_ms: Some(1_767_258_000_000),
                window: Some("Mon-Fri 09:00-17:00 Europe/Berlin".into()),
                tenant: Some("acme".into()),
                strip_baton_headers: true,
                ..MessageMeta::default()
            }
        );
        assert_eq!(s.recipients[0].notify, Notify::SUCCESS | Notify::DELAY);
        assert_eq!(s.recipients[0].state, RcptState::Deferred);
        assert_eq!(s.recipients[0].attempts[0].code, 451);
        assert_eq!(s.dsn_envid.as_deref(), Some("env1"));
        let t = &messages[1];
        assert_eq!(t.body, BodyLocation::File);
        assert_eq!(
            t.envelope.meta,
            MessageMeta {
                tenant: Some("acme".into()),
                campaign: Some("winter".into()),
                pool: Some("transactional".into()),
                hold: false,
                ..MessageMeta::default()
            }
        );
        assert!(!t.envelope.recipients[0].notify.is_given());
        let h = &messages[2].envelope;
        assert!(h.meta.hold);
        assert!(h.recipients[0].notify.is_never());
    };
    let read = Spool::read_only(dir).unwrap();
    check(&read);
    assert_eq!(Spool::read_body(dir, &read[1]).unwrap(), b"two\r\n");
    let new = {
        let (spool, rec) = Spool::open(dir, SpoolOptions::default()).unwrap();
        check(&rec.messages);
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(Spool::read_body(dir, &rec.messages[0]).unwrap(), b"one\r\n");
        assert_eq!(
            Spool::read_body(dir, &rec.messages[2]).unwrap(),
            b"three\r\n"
        );
        // Released in the new format.
        let mut meta = rec.messages[2].envelope.meta.clone();
        meta.hold = false;
        spool
            .record_meta(rec.messages[2].envelope.id, &meta)
            .unwrap();
        store(&spool, b"five\r\n").await
    };
    // The old segment is as it was; the new records are in a new one, in the new format.
    assert_eq!(
        std::fs::read(dir.join("journal/0000000001.log")).unwrap(),
        seg
    );
    let next = std::fs::read(dir.join("journal/0000000002.log")).unwrap();
    assert_eq!(&next[..8], b"BATONJ4\n");
    let (_, rec) = Spool::open(dir, SpoolOptions::default()).unwrap();
    assert_eq!(rec.messages.len(), 4);
    assert!(!rec.messages[2].envelope.meta.hold);
    assert_eq!(rec.messages[3].envelope, new);
    check(
        &rec.messages[..2]
            .iter()
            .cloned()
            .chain([{
                let mut h = rec.messages[2].clone();
                h.envelope.meta.hold = true;
                h
            }])
            .collect::<Vec<_>>(),
    );
}

/// A temporary spool directory with its journal/ and bodies/ folders.
fn dir_with_journal() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("journal")).unwrap();
    std::fs::create_dir_all(dir.path().join("bodies")).unwrap();
    dir
}

/// Copies every file of `from` into `to` (a later copy of a segment holds all an earlier did).
fn snapshot(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        // A segment deleted between listing and copying was already copied whole before.
        let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
    }
}

fn segment_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("journal")).unwrap().count()
}

/// A deferred message behind a lot of finished traffic: compaction copies it forward, so the
/// journal stays small; its body stays readable from where it was committed; and every state
/// compaction leaves on disk (old segments still there, new record torn or whole) recovers it
/// once, with its update.
#[tokio::test]
async fn a_waiting_message_does_not_pin_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let union = tempfile::tempdir().unwrap();
    let options = SpoolOptions {
        segment_size: 4 << 10,
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(dir.path(), options.clone()).unwrap();
    let body = b"Subject: waits\r\n\r\nstubborn destination\r\n".repeat(10);
    let waiting = envelope(&spool, body.len() as u64);
    let mut w = spool.body_writer(waiting.id);
    w.buf().extend_from_slice(&body);
    let (location, _) = spool.commit(&waiting, w).await.unwrap();
    let attempt = Attempt {
        at_ms: 7,
        code: 421,
        status: "4.7.0".into(),
        diagnostic: "try again later".into(),
        remote_mta: Some("mx.example.net".into()),
    };
    let deferred = RecipientUpdate {
        id: waiting.id,
        rcpt: 0,
        state: RcptState::Deferred,
        attempt: Some(attempt),
        next_attempt_ms: 1234,
        delay_notified: false,
    };
    spool.record(std::slice::from_ref(&deferred), &[]).unwrap();
    let mut most = 0;
    for i in 0..300 {
        let env = store(&spool, format!("through {i}\r\n").repeat(60).as_bytes()).await;
        spool.record(&[], &[env.id]).unwrap();
        snapshot(&dir.path().join("journal"), &union.path().join("journal"));
        most = most.max(segment_count(dir.path()));
    }
    store(&spool, b"flush\r\n").await;
    snapshot(&dir.path().join("journal"), &union.path().join("journal"));
    let unioned = segment_count(union.path());
    assert!(unioned > 40, "only {unioned} segments were ever written");
    assert!(most <= 6, "the journal reached {most} segments");
    assert_eq!(
        &spool.load_body(waiting.id, location).unwrap()[..],
        &body[..],
        "read from where it was committed"
    );
    drop(spool);

    let check = |dir: &std::path::Path, exact: bool| {
        let (_, rec) = Spool::open(dir, options.clone()).unwrap();
        let found: Vec<_> = rec
            .messages
            .iter()
            .filter(|m| m.envelope.id == waiting.id)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{} {:?}",
            dir.display(),
            baton_spool::journal::list_segments(&dir.join("journal"))
        );
        let r = &found[0].envelope.recipients[0];
        assert_eq!(r.state, RcptState::Deferred);
        assert_eq!(r.attempts.len(), 1);
        assert_eq!(r.next_attempt_ms, 1234);
        assert_eq!(Spool::read_body(dir, found[0]).unwrap(), body);
        if exact {
            // The finished ones stay finished (two left: the waiting one and "flush").
            let ids: Vec<_> = rec
                .messages
                .iter()
                .map(|m| (m.envelope.id, m.body))
                .collect();
            assert_eq!(
                rec.messages.len(),
                2,
                "{} {ids:?} waiting {}",
                dir.display(),
                waiting.id
            );
        }
    };
    check(dir.path(), true);
    // (Copies of the union, which must stay as it is.) The newest segment cut short anywhere: at worst some of the last finished come back.
    let journal = union.path().join("journal");
    let last = baton_spool::journal::list_segments(&journal)
        .unwrap()
        .into_iter()
        .max()
        .unwrap();
    let last_path = baton_spool::journal::segment_path(&journal, last);
    let len = std::fs::metadata(&last_path).unwrap().len();
    for cut in (8..len).step_by(97) {
        let torn = tempfile::tempdir().unwrap();
        snapshot(&journal, &torn.path().join("journal"));
        let f = OpenOptions::new()
            .write(true)
            .open(baton_spool::journal::segment_path(
                &torn.path().join("journal"),
                last,
            ))
            .unwrap();
        f.set_len(cut).unwrap();
        check(torn.path(), false);
    }
    // Last, as opening it deletes what it no longer needs. No segment ever deleted: the
    // copies forward follow the originals.
    check(union.path(), true);
}

/// `Spool::start` takes mail at once and replays in the background: new ids are above every
/// old one, the replay hands over the live messages (packed, attempts counted), cuts the torn
/// tail and removes orphan bodies; and only after it are old segments deleted.
#[tokio::test]
async fn start_takes_mail_at_once_and_replays_in_the_background() {
    use baton_spool::recover::Recovering;
    let dir = tempfile::tempdir().unwrap();
    let options = SpoolOptions {
        segment_size: 4 << 10,
        ..SpoolOptions::default()
    };
    let large: Vec<u8> = vec![b'L'; 300 << 10];
    let (deferred, big, orphan) = {
        let (spool, _) = Spool::open(dir.path(), options.clone()).unwrap();
        let deferred = store(&spool, b"deferred\r\n").await;
        let big = store(&spool, &large).await;
        let finished = store(&spool, b"finished\r\n").await;
        let attempt = Attempt {
            at_ms: 5,
            code: 451,
            status: "4.3.0".into(),
            diagnostic: "later".into(),
            remote_mta: None,
        };
        let update = RecipientUpdate {
            id: deferred.id,
            rcpt: 0,
            state: RcptState::Deferred,
            attempt: Some(attempt),
            next_attempt_ms: 77,
            delay_notified: false,
        };
        spool.record(&[update], &[finished.id]).unwrap();
        for i in 0..20 {
            let e = store(&spool, format!("through {i}\r\n").repeat(30).as_bytes()).await;
            spool.record(&[], &[e.id]).unwrap();
        }
        store(&spool, b"last\r\n").await;
        // A body left by a transaction cut off before its commit.
        let orphan = baton_spool::QueueId(deferred.id.0 - 1);
        std::fs::write(dir.path().join("bodies").join(orphan.to_string()), b"x").unwrap();
        (deferred, big, orphan)
    };
    let journal = dir.path().join("journal");
    let last = *baton_spool::journal::list_segments(&journal)
        .unwrap()
        .last()
        .unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(baton_spool::journal::segment_path(&journal, last))
        .unwrap();
    f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
    drop(f);
    let before = segment_count(dir.path());

    let (spool, mut replay) = Spool::start(dir.path(), options.clone()).unwrap();
    let fresh = store(&spool, b"new mail\r\n").await;
    assert!(fresh.id > big.id, "new ids follow the old");
    let mut recovered = Vec::new();
    let report = loop {
        match replay.recv().await.unwrap() {
            Recovering::Messages(chunk) => recovered.extend(chunk),
            Recovering::Done(report) => break report.unwrap(),
        }
    };
    assert_eq!(report.truncated_bytes, 6);
    assert_eq!(report.orphan_bodies_removed, 1);
    assert!(!dir.path().join("bodies").join(orphan.to_string()).exists());
    assert!(dir.path().join("bodies").join(big.id.to_string()).exists());
    let ids: Vec<_> = recovered.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 3, "deferred, big and last: {ids:?}");
    assert_eq!(ids[..2], [deferred.id, big.id]);
    let first = &recovered[0];
    assert_eq!(&first.attempts[..], &[1]);
    let env = first.envelope.view();
    assert_eq!(env.recipients[0].state, RcptState::Deferred);
    assert_eq!(env.recipients[0].next_attempt_ms, 77);
    assert!(
        env.recipients[0].attempts.is_empty(),
        "history stays in the spool"
    );
    assert_eq!(recovered[1].body, BodyLocation::File);

    // Once every message is done, the old segments go too.
    let all: Vec<_> = ids.iter().copied().chain([fresh.id]).collect();
    spool.record(&[], &all).unwrap();
    store(&spool, b"flush\r\n").await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    store(&spool, b"flush again\r\n").await;
    let after = baton_spool::journal::list_segments(&journal).unwrap();
    assert!(
        after.iter().all(|&n| n > last),
        "old segments {before} (to {last}) still there: {after:?}"
    );
    drop(spool);
    let (_, rec) = Spool::open(dir.path(), options).unwrap();
    assert_eq!(rec.messages.len(), 2, "the two flushes");
}

/// Ids handed out before the replay are above every id on disk, even one from a clock that
/// ran ahead (a queue id's high bits are its time).
#[tokio::test]
async fn start_gives_ids_above_an_old_id_from_the_future() {
    let dir = tempfile::tempdir().unwrap();
    let future = {
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let mut env = envelope(&spool, 3);
        env.id = baton_spool::QueueId(env.id.0 + (86_400_000 << 20));
        let mut w = spool.body_writer(env.id);
        w.buf().extend_from_slice(b"x\r\n");
        spool.commit(&env, w).await.unwrap();
        for _ in 0..3 {
            store(&spool, b"later\r\n").await;
        }
        env.id
    };
    let (spool, _replay) = Spool::start(dir.path(), SpoolOptions::default()).unwrap();
    assert!(spool.next_id() > future);
}

/// A spool of another format version is refused at start, before anything is appended to it
/// (as `Spool::open` refuses it), not found out later by the background replay.
#[test]
fn start_refuses_a_spool_of_another_format() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    let segment = baton_spool::journal::segment_path(&journal, 1);
    std::fs::write(&segment, b"BATONJ9\nwhatever comes next").unwrap();
    let err = Spool::start(dir.path(), SpoolOptions::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("spool format"), "{err}");
    assert_eq!(baton_spool::journal::list_segments(&journal).unwrap(), [1]);
}

/// The last handle dropped while the replay waits for its messages to be taken (a server
/// stopped during recovery) returns: the replay does not keep the committer alive meanwhile.
#[tokio::test]
async fn dropping_the_spool_while_the_replay_waits_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        store(&spool, b"waiting\r\n").await;
    }
    let (spool, replay) = Spool::start(dir.path(), SpoolOptions::default()).unwrap();
    // Give the replay time to hand its one chunk over and block on the report after it.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(spool);
        let _ = done_tx.send(());
    });
    let dropped = done_rx.recv_timeout(std::time::Duration::from_secs(10));
    drop(replay);
    assert!(dropped.is_ok(), "dropping the spool hung");
}
