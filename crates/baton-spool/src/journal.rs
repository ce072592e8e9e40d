//! The on-disk journal: numbered segment files of checksummed records, appended in batches.
//!
//! Segment layout: an 8-byte magic, then frames
//! `len:u32le | crc32:u32le | kind:u8 | payload` where `len` counts `kind` and `payload` and the
//! CRC covers them. A frame is valid only if complete and its CRC matches, so a batch torn by a
//! crash is detected and cut off at recovery; everything before it had been fsynced.
//!
//! Message payload: `envelope_len:u32le | envelope (postcard) | body` where the body is empty
//! when it lives in its own file under `bodies/` (large messages).
//!
//! Versions: postcard is not self-describing, so a changed record layout gets new kinds and the
//! old kinds are still decoded and converted (see `legacy.rs`). Segments written since typed
//! meta start with `BATONJ4`; `BATONJ3` segments (envelope format 1) are read but never
//! appended to, so a Baton that knows only format 1 refuses the spool instead of taking the
//! new kinds for a torn tail.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::envelope::{Envelope, MessageMeta, QueueId, RecipientUpdate};
use crate::legacy::EnvelopeV1;

/// The magic of segments this version writes.
pub const MAGIC: &[u8; 8] = b"BATONJ4\n";
/// The magic of segments written before typed meta (envelope format 1): read, never appended to.
pub const MAGIC_J3: &[u8; 8] = b"BATONJ3\n";
/// Format 1 envelope, body inline (segments `BATONJ3`).
pub const KIND_MESSAGE_INLINE_V1: u8 = 1;
/// Format 1 envelope, body in `bodies/<queue id>`.
pub const KIND_MESSAGE_FILE_V1: u8 = 2;
/// A recipient's new state after a delivery attempt (postcard `RecipientUpdate`).
pub const KIND_UPDATE: u8 = 3;
/// Every recipient of a message is final: the message is gone (8-byte queue id).
pub const KIND_DONE: u8 = 4;
/// Format 1 meta entry set or replaced (postcard `(QueueId, key, value)`).
pub const KIND_META_V1: u8 = 5;
/// A message (envelope format 2, typed meta) whose body follows the envelope in the same frame.
pub const KIND_MESSAGE_INLINE: u8 = 6;
/// A message (envelope format 2) whose body is in `bodies/<queue id>`.
pub const KIND_MESSAGE_FILE: u8 = 7;
/// A message's meta replaced whole (postcard `(QueueId, MessageMeta)`).
pub const KIND_META: u8 = 8;
const FRAME_HEADER: usize = 9;

/// Where a message's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLocation {
    /// Inside a journal segment.
    Inline { segment: u64, offset: u64, len: u64 },
    /// In `bodies/<queue id>`.
    File,
}

/// One journal record, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Message(StoredMessage),
    Update(RecipientUpdate),
    Done(QueueId),
    /// A message's meta, replacing what it had.
    Meta(QueueId, MessageMeta),
    /// One format 1 meta entry (key, value), set on a message's typed meta by key.
    MetaV1(QueueId, String, String),
}

/// What reading a segment found.
#[derive(Debug)]
pub struct Scan {
    pub records: Vec<Record>,
    /// Offset just past the last valid frame; anything after it is a torn or corrupt tail.
    pub valid_len: u64,
    pub file_len: u64,
    /// The segment starts with [`MAGIC`] (false: an older format, or no header at all).
    pub current: bool,
}

/// A message as found in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub envelope: Envelope,
    pub body: BodyLocation,
}

pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:010}.log"))
}

/// Segment numbers present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_suffix(".log")
            .and_then(|s| s.parse::<u64>().ok())
        {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Builds the frame header and envelope part of a message record; the body follows it on disk.
pub fn encode_message(
    envelope: &Envelope,
    body: &[u8],
    body_in_file: bool,
) -> Result<Vec<u8>, postcard::Error> {
    let env = postcard::to_stdvec(envelope)?;
    let len = 1 + 4 + env.len() + body.len();
    let mut head = Vec::with_capacity(FRAME_HEADER + 4 + env.len());
    head.extend_from_slice(&(len as u32).to_le_bytes());
    head.extend_from_slice(&[0; 4]);
    head.push(if body_in_file {
        KIND_MESSAGE_FILE
    } else {
        KIND_MESSAGE_INLINE
    });
    head.extend_from_slice(&(env.len() as u32).to_le_bytes());
    head.extend_from_slice(&env);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[8..]);
    crc.update(body);
    head[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    Ok(head)
}

/// A whole frame of `kind` around `payload`.
fn encode_frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

pub fn encode_update(update: &RecipientUpdate, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    let payload = postcard::to_stdvec(update)?;
    encode_frame(KIND_UPDATE, &payload, out);
    Ok(())
}

pub fn encode_meta(
    id: QueueId,
    meta: &MessageMeta,
    out: &mut Vec<u8>,
) -> Result<(), postcard::Error> {
    let payload = postcard::to_stdvec(&(id, meta))?;
    encode_frame(KIND_META, &payload, out);
    Ok(())
}

pub fn encode_done(id: QueueId, out: &mut Vec<u8>) {
    encode_frame(KIND_DONE, &id.0.to_le_bytes(), out);
}

/// Reads one segment: its records and where its valid part ends.
pub fn scan_segment(path: &Path, number: u64) -> io::Result<Scan> {
    scan_segment_for(path, number, |_| true)
}

/// [`scan_segment`], keeping only the records of messages `want` takes: the others are
/// checked but not decoded (compaction looks for a few messages in whole segments).
pub fn scan_segment_for(
    path: &Path,
    number: u64,
    want: impl Fn(QueueId) -> bool,
) -> io::Result<Scan> {
    let mut records = Vec::new();
    let mut scan = scan_segment_each(path, number, want, |r| records.push(r))?;
    scan.records = records;
    Ok(scan)
}

/// [`scan_segment_for`], handing each record to `each` as it is read instead of collecting
/// them (the replay of a large spool keeps one decoded record at a time, not a segment's).
/// The returned scan's `records` is empty.
pub fn scan_segment_each(
    path: &Path,
    number: u64,
    want: impl Fn(QueueId) -> bool,
    mut each: impl FnMut(Record),
) -> io::Result<Scan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    let mut scan = Scan {
        records: Vec::new(),
        valid_len: 0,
        file_len,
        current: false,
    };
    if reader.read_exact(&mut magic).is_err() || !known_magic(path, &magic)? {
        return Ok(scan);
    }
    scan.current = &magic == MAGIC;
    let mut offset = MAGIC.len() as u64;
    let mut frame = Vec::new();
    loop {
        let mut header = [0u8; 8];
        if reader.read_exact(&mut header).is_err() {
            break;
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || offset + 8 + len > file_len {
            break;
        }
        frame.resize(len as usize, 0);
        if reader.read_exact(&mut frame).is_err() || crc32fast::hash(&frame) != crc {
            break;
        }
        if !record_id(&frame).is_none_or(&want) {
            offset += 8 + len;
            continue;
        }
        let record = match frame[0] {
            KIND_MESSAGE_INLINE
            | KIND_MESSAGE_FILE
            | KIND_MESSAGE_INLINE_V1
            | KIND_MESSAGE_FILE_V1 => decode_message(&frame, number, offset).map(Record::Message),
            KIND_UPDATE => postcard::from_bytes(&frame[1..]).ok().map(Record::Update),
            KIND_META => postcard::from_bytes::<(QueueId, MessageMeta)>(&frame[1..])
                .ok()
                .map(|(id, meta)| Record::Meta(id, meta)),
            KIND_META_V1 => postcard::from_bytes::<(QueueId, String, String)>(&frame[1..])
                .ok()
                .map(|(id, k, v)| Record::MetaV1(id, k, v)),
            KIND_DONE => frame
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(|b| Record::Done(QueueId(u64::from_le_bytes(b)))),
            _ => None,
        };
        match record {
            Some(r) => each(r),
            None => break,
        }
        offset += 8 + len;
    }
    scan.valid_len = offset;
    Ok(scan)
}

/// The largest queue id of a message record in a segment, read from frame headers and the
/// first bytes of each envelope (bodies and other records are skipped unread, nothing is
/// checked): what a spool opened before its replay needs to hand out ids above all it holds.
pub fn max_message_id(path: &Path) -> io::Result<Option<QueueId>> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    if reader.read_exact(&mut magic).is_err() || !known_magic(path, &magic)? {
        return Ok(None);
    }
    let (mut offset, mut max) = (MAGIC.len() as u64, None);
    let mut head = [0u8; 8 + 1 + 4 + 10];
    loop {
        if reader.read_exact(&mut head[..9]).is_err() {
            break;
        }
        let len = u64::from(u32::from_le_bytes([head[0], head[1], head[2], head[3]]));
        if len == 0 || offset + 8 + len > file_len {
            break;
        }
        let mut read = 1;
        if matches!(
            head[8],
            KIND_MESSAGE_INLINE | KIND_MESSAGE_FILE | KIND_MESSAGE_INLINE_V1 | KIND_MESSAGE_FILE_V1
        ) {
            let want = (len as usize).min(1 + 4 + 10);
            if reader.read_exact(&mut head[9..8 + want]).is_err() {
                break;
            }
            read = want as u64;
            if let Some(Ok((id, _))) = head
                .get(13..8 + want)
                .map(postcard::take_from_bytes::<QueueId>)
            {
                max = max.max(Some(id));
            }
        }
        reader.seek_relative((len - read) as i64)?;
        offset += 8 + len;
    }
    Ok(max)
}

/// Whether a segment starts with a magic this version reads (false: no header, a torn file);
/// another version's magic is an error: never take it for a torn file and overwrite it.
fn known_magic(path: &Path, magic: &[u8; 8]) -> io::Result<bool> {
    if magic == MAGIC || magic == MAGIC_J3 {
        return Ok(true);
    }
    if !magic.starts_with(b"BATONJ") {
        return Ok(false);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is spool format {:?}; this Baton reads {:?} and {:?} (drain the queue \
             with the version that wrote it, or move the spool aside)",
            path.display(),
            String::from_utf8_lossy(&magic[..7]),
            String::from_utf8_lossy(&MAGIC[..7]),
            String::from_utf8_lossy(&MAGIC_J3[..7])
        ),
    ))
}

/// The queue id a frame is about, read without decoding the rest (every kind starts with it).
fn record_id(frame: &[u8]) -> Option<QueueId> {
    let id = match *frame.first()? {
        KIND_MESSAGE_INLINE | KIND_MESSAGE_FILE | KIND_MESSAGE_INLINE_V1 | KIND_MESSAGE_FILE_V1 => {
            postcard::take_from_bytes::<QueueId>(frame.get(5..)?)
                .ok()?
                .0
        }
        KIND_UPDATE | KIND_META | KIND_META_V1 => {
            postcard::take_from_bytes::<QueueId>(frame.get(1..)?)
                .ok()?
                .0
        }
        KIND_DONE => QueueId(u64::from_le_bytes(frame.get(1..9)?.try_into().ok()?)),
        _ => return None,
    };
    Some(id)
}

fn decode_message(frame: &[u8], segment: u64, frame_offset: u64) -> Option<StoredMessage> {
    let env_len = u32::from_le_bytes(frame.get(1..5)?.try_into().ok()?) as usize;
    let env_bytes = frame.get(5..5 + env_len)?;
    let envelope: Envelope = match frame[0] {
        KIND_MESSAGE_INLINE_V1 | KIND_MESSAGE_FILE_V1 => {
            postcard::from_bytes::<EnvelopeV1>(env_bytes).ok()?.into()
        }
        _ => postcard::from_bytes(env_bytes).ok()?,
    };
    let body_len = (frame.len() - 5 - env_len) as u64;
    let body = if matches!(frame[0], KIND_MESSAGE_FILE | KIND_MESSAGE_FILE_V1) {
        BodyLocation::File
    } else {
        BodyLocation::Inline {
            segment,
            offset: frame_offset + 8 + 5 + env_len as u64,
            len: body_len,
        }
    };
    Some(StoredMessage { envelope, body })
}

/// The segment being appended to. Owned by the committer thread alone.
pub struct ActiveSegment {
    dir: PathBuf,
    pub number: u64,
    file: File,
    pub len: u64,
}

impl ActiveSegment {
    /// Creates segment `number` (with its magic) and makes its directory entry durable.
    ///
    /// A failure (ENOSPC, EIO) removes the file again, and a file left by an earlier failed
    /// attempt or a crash (its header at most: no record) is replaced: otherwise every later
    /// batch would fail on it, and all mail be refused until a restart.
    pub fn create(dir: &Path, number: u64, fsync: bool) -> io::Result<Self> {
        let path = segment_path(dir, number);
        let open = || {
            OpenOptions::new()
                .create_new(true)
                .read(true)
                .append(true)
                .open(&path)
        };
        let mut file = match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && holds_no_record(&path) => {
                fs::remove_file(&path)?;
                open()?
            }
            other => other?,
        };
        let started = file.write_all(MAGIC).and_then(|()| {
            if fsync {
                file.sync_data()?;
                sync_dir(dir)?;
            }
            Ok(())
        });
        if let Err(e) = started {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(ActiveSegment {
            dir: dir.to_path_buf(),
            number,
            file,
            len: MAGIC.len() as u64,
        })
    }

    /// Reopens an existing segment for appending, cutting off a torn tail at `valid_len`.
    pub fn reopen(dir: &Path, number: u64, valid_len: u64, file_len: u64) -> io::Result<Self> {
        let path = segment_path(dir, number);
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        if valid_len < MAGIC.len() as u64 {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(MAGIC)?;
            file.sync_data()?;
            return Self::reopen(dir, number, MAGIC.len() as u64, MAGIC.len() as u64);
        }
        if file_len > valid_len {
            file.set_len(valid_len)?;
            file.sync_data()?;
        }
        file.seek(SeekFrom::Start(valid_len))?;
        Ok(ActiveSegment {
            dir: dir.to_path_buf(),
            number,
            file,
            len: valid_len,
        })
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn rotate(&mut self, fsync: bool) -> io::Result<()> {
        *self = ActiveSegment::create(&self.dir, self.number + 1, fsync)?;
        Ok(())
    }

    /// Appends `slices` and makes them durable. On failure the segment is cut back to where it
    /// was, so a failed batch leaves no partial record behind.
    pub fn append(&mut self, slices: &mut [IoSlice<'_>], fsync: bool) -> io::Result<()> {
        let start = self.len;
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let result = write_all_vectored(&mut self.file, slices)
            .and_then(|()| if fsync { self.file.sync_data() } else { Ok(()) });
        match result {
            Ok(()) => {
                self.len += total as u64;
                Ok(())
            }
            Err(err) => {
                let _ = self.file.set_len(start);
                let _ = self.file.seek(SeekFrom::Start(start));
                Err(err)
            }
        }
    }
}

fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "journal write")),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A segment file that holds nothing but (part of) its header, of this format or the last.
fn holds_no_record(path: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.len() > MAGIC.len() as u64 {
        return false;
    }
    let mut head = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAGIC.len() as u64).read_to_end(&mut head))
        .is_ok_and(|_| MAGIC.starts_with(&head) || MAGIC_J3.starts_with(&head))
}

/// fsyncs a directory so that entries created in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
