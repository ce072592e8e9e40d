//! The operator's suspensions on disk (`data_dir/operator-suspensions.json`, a JSON list of
//! `[key, until_ms]`): read at start, written by a thread of its own so that the queue
//! manager's loop never waits on the file. The latest snapshot wins (each write replaces the
//! file: temporary file, then rename), and an operator's answer goes once the state it changed
//! is written, as when the loop wrote it itself. Owns that file only.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::oneshot;

/// An answer (of type `A`) to send once the snapshot it came with is written.
pub(super) type Reply<A> = (oneshot::Sender<A>, A);

type Snapshot = Vec<(String, u64)>;

struct Save<A> {
    snapshot: Snapshot,
    answer: Option<Reply<A>>,
}

pub(super) struct OperatorState<A> {
    path: PathBuf,
    /// None when the thread could not start: then saves are written inline.
    writer: Option<mpsc::Sender<Save<A>>>,
}

impl<A: Send + 'static> OperatorState<A> {
    pub(super) fn new(data_dir: &Path) -> OperatorState<A> {
        let path = data_dir.join("operator-suspensions.json");
        let (tx, rx) = mpsc::channel();
        let thread_path = path.clone();
        let writer = std::thread::Builder::new()
            .name("operator-state".into())
            .spawn(move || write_latest(&thread_path, rx))
            .map_err(|e| tracing::warn!(error = %e, "operator state is written inline"))
            .ok()
            .map(|_| tx);
        OperatorState { path, writer }
    }

    /// The suspensions saved by an earlier run (read once, before the loop starts).
    pub(super) fn load(&self) -> Option<Snapshot> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Saves `snapshot`, then sends `answer`.
    pub(super) fn save(&self, snapshot: Snapshot, answer: Option<Reply<A>>) {
        let save = Save { snapshot, answer };
        let unsent = match &self.writer {
            Some(tx) => tx.send(save).err().map(|mpsc::SendError(save)| save),
            None => Some(save),
        };
        if let Some(save) = unsent {
            write(&self.path, &save.snapshot);
            answer_all([save.answer]);
        }
    }
}

/// The writer thread: writes the newest of whatever is waiting, then answers each.
fn write_latest<A>(path: &Path, rx: mpsc::Receiver<Save<A>>) {
    while let Ok(first) = rx.recv() {
        let mut snapshot = first.snapshot;
        let mut answers = vec![first.answer];
        while let Ok(next) = rx.try_recv() {
            snapshot = next.snapshot;
            answers.push(next.answer);
        }
        write(path, &snapshot);
        answer_all(answers);
    }
}

fn answer_all<A>(answers: impl IntoIterator<Item = Option<Reply<A>>>) {
    for (tx, answer) in answers.into_iter().flatten() {
        let _ = tx.send(answer);
    }
}

fn write(path: &Path, snapshot: &Snapshot) {
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_vec(snapshot)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::error!(path = %path.display(), error = %e, "cannot save the operator's suspensions");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_answer_comes_once_the_latest_state_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let state = OperatorState::new(dir.path());
        assert_eq!(state.load(), None);
        let mut answers = Vec::new();
        for n in 0..20u64 {
            let (tx, rx) = oneshot::channel();
            let snapshot = vec![("example.com".to_string(), n)];
            state.save(snapshot, Some((tx, serde_json::json!(n))));
            answers.push(rx);
        }
        for (n, rx) in answers.into_iter().enumerate() {
            assert_eq!(rx.await.unwrap(), serde_json::json!(n));
        }
        assert_eq!(state.load(), Some(vec![("example.com".to_string(), 19)]));
    }
}
