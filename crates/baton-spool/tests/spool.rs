//! The spool on a real file system: commit, recover, torn tails, large bodies, group commit.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};

use baton_spool::{
    Attempt, BodyLocation, Envelope, RcptState, Recipient, RecipientUpdate, Spool, SpoolOptions,
};

fn envelope(spool: &Spool, size: u64) -> Envelope {
    Envelope {
        id: spool.next_id(),
        sender: "a@example.com".into(),
        recipients: vec![Recipient::new(
            "b@example.net".into(),
            Some("b@example.net".into()),
            4,
        )],
        dsn_ret: None,
        dsn_envid: Some("env1".into()),
        eight_bit: true,
        smtputf8: false,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: "client.example".into(),
        arrived_ms: 1,
        size,
        meta: Vec::new(),
    }
}

async fn store(spool: &Spool, body: &[u8]) -> Envelope {
    let env = envelope(spool, body.len() as u64);
    let mut w = spool.body_writer(env.id);
    // Feed in pieces, as a session does.
    for chunk in body.chunks(7919) {
        w.buf().extend_from_slice(chunk);
        w.settle().unwrap();
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
    w.settle().unwrap();
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
    for leftover in [&b""[..], &b"BATO"[..], &baton_spool_magic()[..]] {
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
    b"BATONJ3\n".to_vec()
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
    // Segments before the first live message's are gone; at most those from it on remain.
    let segments = std::fs::read_dir(dir.path().join("journal"))
        .unwrap()
        .count();
    let first_segment = match rec.messages[0].body {
        BodyLocation::Inline { segment, .. } => segment,
        BodyLocation::File => panic!("small body in a file"),
    };
    assert_eq!(first_segment, 1);
    assert!(segments >= 2);
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
