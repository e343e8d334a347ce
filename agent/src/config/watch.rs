//! Watching the policy file (inotify, through `notify`): a change of its content reloads it,
//! as SIGHUP does.
//!
//! What is watched is the file's *directory*, not the file: editors write a new file and
//! rename it over the old one, and a Kubernetes ConfigMap volume never touches the file at
//! all (`policy.yaml -> ..data/policy.yaml`, and an update renames a new `..data` symlink,
//! pointing at a new timestamped directory, over the old one). So the events that count are
//! those naming an entry on the way from the file's path to its content: the file itself, every
//! symlink it goes through and the directories those live in (`..data`), and the file where
//! it really is (a symlink into another directory: that directory is watched too). The set is
//! worked out again after every change, as a swap moves the real file.
//!
//! Events are debounced ([`DEBOUNCE`]: a write is several events, a rename two), then the
//! file is read, and only content that differs from what was last read is reported: a touch
//! or a `chmod`, or an update that writes the same bytes, reloads nothing. A half-written file
//! (read while an editor writes it in place) is reported like any other content; it fails
//! validation, and the event of the end of the write reports the finished file. A file that
//! is gone ([`GONE_GRACE`] after the last event: an editor may rename the old file away
//! before it writes the new one) is reported once, and its return is a change.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    io::ErrorKind,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use notify::{
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep_until},
};

/// The quiet time after an event before the file is read. Short: the time from a save to the
/// new policy in force counts it (the goal is under 50 ms with 1,000 services), and what it
/// waits for, the other events of one save (an editor's write, close and rename; a ConfigMap
/// update's rename), come within a millisecond or so of each other. A write that pauses
/// longer is read half-way, fails validation, and is read again when it ends.
pub const DEBOUNCE: Duration = Duration::from_millis(10);
/// Events that keep coming (a slow writer, or a busy directory) delay the read at most this
/// long after the first.
pub const DEBOUNCE_MAX: Duration = Duration::from_millis(250);
/// How long the file may be missing before that is reported: an editor that renames the old
/// file away (a backup) writes the new one right after.
pub const GONE_GRACE: Duration = Duration::from_millis(200);
/// While a directory on the way to the file cannot be watched (it was removed), watching it
/// is tried again this often.
pub const REWATCH: Duration = Duration::from_secs(1);
/// Symlinks followed from the file's path, as the kernel's own limit (`ELOOP`).
const MAX_LINKS: usize = 40;

/// What the watch reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileChange {
    /// The file's content differs from what was last read: reload it.
    Changed,
    /// The file is gone (deleted, or renamed away); the watch goes on and reports its return
    /// as [`FileChange::Changed`].
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watching {dir} (the directory of {file}) for changes: {source}")]
    Watch {
        dir: PathBuf,
        file: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("watching {file}: {source}")]
    Start {
        file: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("watching {file}: the current directory: {source}")]
    Path {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The watch of one policy file: a task of its own, stopped when this is dropped.
#[derive(Debug)]
pub struct PolicyWatch {
    changes: mpsc::Receiver<FileChange>,
    task: JoinHandle<()>,
}

impl PolicyWatch {
    /// Starts watching `file` (inside a tokio runtime). The content as it is now is the
    /// reference: start the watch before reading the policy, so that a change in between is
    /// reported. An error when the file's directory cannot be watched.
    pub fn start(file: &Path) -> Result<PolicyWatch, WatchError> {
        let file = std::path::absolute(file).map_err(|source| WatchError::Path {
            file: file.to_owned(),
            source,
        })?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let notify = RecommendedWatcher::new(
            move |event| {
                // Only fails once the watch task is gone.
                let _ = events_tx.send(event);
            },
            notify::Config::default(),
        )
        .map_err(|source| WatchError::Start {
            file: file.clone(),
            source,
        })?;
        let mut watch = Watch {
            file,
            notify,
            entries: BTreeSet::new(),
            watched: BTreeSet::new(),
            unwatched: Vec::new(),
            seen: Seen::Unread,
        };
        watch.refresh();
        // The file's own directory must be watched from the start; others (where a symlink
        // leads) may come later.
        let dir = watch.file.parent().map(canonical).unwrap_or_default();
        if let Some(i) = watch.unwatched.iter().position(|(d, _)| *d == dir) {
            let (dir, source) = watch.unwatched.swap_remove(i);
            return Err(WatchError::Watch {
                dir,
                file: watch.file,
                source,
            });
        }
        // After the watches are in place: a change from here on is an event.
        watch.seen = Seen::read(&watch.file);
        let (changes_tx, changes) = mpsc::channel(8);
        let task = tokio::spawn(watch.run(events, changes_tx));
        Ok(PolicyWatch { changes, task })
    }

    /// The next change (cancel-safe: a `select!` that drops it loses nothing).
    pub async fn changed(&mut self) -> FileChange {
        match self.changes.recv().await {
            Some(c) => c,
            // The task ended (it does not, but if it did): nothing more will come.
            None => std::future::pending().await,
        }
    }
}

impl Drop for PolicyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the file held when last read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Not read yet.
    Unread,
    Content(Vec<u8>),
    Missing,
    /// Not readable for another reason (the reload says which).
    Unreadable(ErrorKind),
}

impl Seen {
    fn read(file: &Path) -> Seen {
        match std::fs::read(file) {
            Ok(bytes) => Seen::Content(bytes),
            Err(e) if e.kind() == ErrorKind::NotFound => Seen::Missing,
            Err(e) => Seen::Unreadable(e.kind()),
        }
    }
}

struct Watch {
    /// Absolute, symlinks not resolved: the path the agent was given.
    file: PathBuf,
    notify: RecommendedWatcher,
    /// (canonical directory, name): the entries whose events count.
    entries: BTreeSet<(PathBuf, OsString)>,
    /// The directories watched (canonical paths).
    watched: BTreeSet<PathBuf>,
    /// Directories that should be watched and could not be, and why.
    unwatched: Vec<(PathBuf, notify::Error)>,
    seen: Seen,
}

impl Watch {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<notify::Result<Event>>,
        changes: mpsc::Sender<FileChange>,
    ) {
        loop {
            // An event that counts, or (while a directory could not be watched) the retry.
            let rewatch = (!self.unwatched.is_empty()).then(|| Instant::now() + REWATCH);
            if self.next_event(&mut events, rewatch).await.is_none() {
                return;
            }
            let now = loop {
                if !self.debounce(&mut events).await {
                    return;
                }
                self.refresh();
                let now = Seen::read(&self.file);
                if now != Seen::Missing || self.seen == Seen::Missing {
                    break now;
                }
                // Gone: give it a moment to come back (an editor's rename away, then write).
                match self
                    .next_event(&mut events, Some(Instant::now() + GONE_GRACE))
                    .await
                {
                    Some(true) => continue,
                    Some(false) => break now,
                    None => return,
                }
            };
            if now == self.seen {
                continue;
            }
            let change = if now == Seen::Missing {
                FileChange::Gone
            } else {
                FileChange::Changed
            };
            self.seen = now;
            if changes.send(change).await.is_err() {
                return;
            }
        }
    }

    /// Waits for an event that counts (`Some(true)`) or until `until` (`Some(false)`);
    /// `None` once the watcher is gone.
    async fn next_event(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<notify::Result<Event>>,
        until: Option<Instant>,
    ) -> Option<bool> {
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(e) if self.counts(&e) => return Some(true),
                    Some(_) => {}
                    None => return None,
                },
                _ = sleep_opt(until) => return Some(false),
            }
        }
    }

    /// Waits until no event that counts came for [`DEBOUNCE`] (at most [`DEBOUNCE_MAX`]).
    /// `false` once the watcher is gone.
    async fn debounce(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<notify::Result<Event>>,
    ) -> bool {
        let first = Instant::now();
        let cap = first + DEBOUNCE_MAX;
        let mut quiet_until = first + DEBOUNCE;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(e) if self.counts(&e) => quiet_until = (Instant::now() + DEBOUNCE).min(cap),
                    Some(_) => {}
                    None => return false,
                },
                _ = sleep_until(quiet_until) => return true,
            }
        }
    }

    /// Whether an event is about an entry on the way to the file. Reads (ours among them)
    /// do not count; errors and overflows (events were lost) do.
    fn counts(&self, event: &notify::Result<Event>) -> bool {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("policy file watch: {e}");
                return true;
            }
        };
        if event.need_rescan() {
            return true;
        }
        if let EventKind::Access(kind) = event.kind
            && kind != AccessKind::Close(AccessMode::Write)
        {
            return false;
        }
        event.paths.iter().any(|p| {
            self.watched.contains(p)
                || match (p.parent(), p.file_name()) {
                    (Some(dir), Some(name)) => self
                        .entries
                        .contains(&(dir.to_path_buf(), name.to_os_string())),
                    _ => false,
                }
        })
    }

    /// Works out the entries on the way to the file again and watches their directories
    /// (again: a directory replaced under the same name gets a watch of its own), and stops
    /// watching those no longer on the way.
    fn refresh(&mut self) {
        self.entries = entries(&self.file);
        let dirs: BTreeSet<PathBuf> = self.entries.iter().map(|(d, _)| d.clone()).collect();
        for gone in self.watched.difference(&dirs) {
            // It may be gone already (deleted: the kernel dropped the watch).
            let _ = self.notify.unwatch(gone);
        }
        let failed_before: BTreeSet<PathBuf> = self.unwatched.drain(..).map(|(d, _)| d).collect();
        self.watched.clear();
        for dir in dirs {
            match self.notify.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    if failed_before.contains(&dir) {
                        tracing::info!("policy file watch: watching {} again", dir.display());
                    }
                    self.watched.insert(dir);
                }
                Err(e) => {
                    // Once, not at every retry.
                    if !failed_before.contains(&dir) {
                        tracing::warn!(
                            "policy file watch: cannot watch {} (retrying every {REWATCH:?}): {e}",
                            dir.display()
                        );
                    }
                    self.unwatched.push((dir, e));
                }
            }
        }
    }
}

/// `sleep_until(at)`, or never.
async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `path` with its symlinks resolved, or as it is when that fails (it does not exist).
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// The entries (directory, name) whose change can change what `file` reads: the file, every
/// symlink on the way from it to its content and every directory named in those links, and
/// the file where it really is. Directories canonical, as the watches report them.
fn entries(file: &Path) -> BTreeSet<(PathBuf, OsString)> {
    let mut out = BTreeSet::new();
    let mut push = |dir: &Path, name: &std::ffi::OsStr| {
        out.insert((canonical(dir), name.to_os_string()));
    };
    let mut path = file.to_path_buf();
    for _ in 0..MAX_LINKS {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            break;
        };
        push(dir, name);
        let Ok(target) = std::fs::read_link(&path) else {
            break;
        };
        // `..data/policy.yaml`: `..data` (a symlink itself, in a ConfigMap volume) counts too.
        let mut at = dir.to_path_buf();
        let parts: Vec<Component> = target.components().collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            match part {
                Component::Normal(n) => {
                    push(&at, n);
                    at.push(n);
                }
                Component::RootDir => at = PathBuf::from("/"),
                Component::ParentDir => at.push(".."),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
        path = dir.join(&target);
    }
    if let Ok(real) = std::fs::canonicalize(file)
        && let (Some(dir), Some(name)) = (real.parent(), real.file_name())
    {
        push(dir, name);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("agent-watch-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p.canonicalize().unwrap())
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Long enough for any debounce and grace to pass, for a change to arrive.
    const ARRIVES: Duration = Duration::from_secs(5);
    /// How long a test waits to see that nothing comes.
    const NOTHING: Duration = Duration::from_millis(600);

    async fn next(w: &mut PolicyWatch) -> Option<FileChange> {
        tokio::time::timeout(ARRIVES, w.changed()).await.ok()
    }

    async fn none(w: &mut PolicyWatch) -> Option<FileChange> {
        tokio::time::timeout(NOTHING, w.changed()).await.ok()
    }

    /// Writes a new file and renames it over `to`, as editors and atomic writers do.
    fn write_rename(to: &Path, text: &str) {
        let tmp = to.with_extension("tmp~");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }

    /// A ConfigMap volume: `name -> ..data/name`, `..data -> ..<stamp>`; an update writes a
    /// new stamped directory, renames a new `..data_tmp` over `..data` and removes the old.
    struct ConfigMap {
        dir: PathBuf,
        stamp: u32,
    }

    impl ConfigMap {
        fn new(dir: &Path, name: &str, text: &str) -> ConfigMap {
            let mut c = ConfigMap {
                dir: dir.to_owned(),
                stamp: 0,
            };
            c.update(name, text);
            symlink(format!("..data/{name}"), dir.join(name)).unwrap();
            c
        }

        fn update(&mut self, name: &str, text: &str) {
            let old = format!("..2026_12_05_00_00_00.{}", self.stamp);
            self.stamp += 1;
            let new = format!("..2026_12_05_00_00_00.{}", self.stamp);
            std::fs::create_dir(self.dir.join(&new)).unwrap();
            std::fs::write(self.dir.join(&new).join(name), text).unwrap();
            symlink(&new, self.dir.join("..data_tmp")).unwrap();
            std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
    }

    #[test]
    fn entries_follow_a_configmap_volume() {
        let d = Dir::new("entries");
        let _cm = ConfigMap::new(&d.0, "policy.yaml", "a");
        let got: Vec<(PathBuf, String)> = entries(&d.0.join("policy.yaml"))
            .into_iter()
            .map(|(dir, n)| (dir, n.to_string_lossy().into_owned()))
            .collect();
        let stamped = d.0.join("..2026_12_05_00_00_00.1");
        assert_eq!(
            got,
            [
                (d.0.clone(), "..data".to_owned()),
                (d.0.clone(), "policy.yaml".to_owned()),
                (stamped, "policy.yaml".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn content_changes_are_reported_and_the_rest_is_not() {
        let d = Dir::new("content");
        let f = d.0.join("policy.yaml");
        std::fs::write(&f, "one").unwrap();
        let mut w = PolicyWatch::start(&f).unwrap();
        // Another file of the directory, and a touch of the same content: nothing.
        std::fs::write(d.0.join("other.log"), "x").unwrap();
        std::fs::write(&f, "one").unwrap();
        assert_eq!(none(&mut w).await, None);
        // In place.
        std::fs::write(&f, "two").unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
        // Written elsewhere and renamed over.
        write_rename(&f, "three");
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
        assert_eq!(none(&mut w).await, None);
    }

    #[tokio::test]
    async fn a_deleted_file_is_reported_once_and_its_return_is_a_change() {
        let d = Dir::new("gone");
        let f = d.0.join("policy.yaml");
        std::fs::write(&f, "one").unwrap();
        let mut w = PolicyWatch::start(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Gone));
        assert_eq!(none(&mut w).await, None);
        // Back with the same content: it was gone, so this is a change.
        std::fs::write(&f, "one").unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
    }

    #[tokio::test]
    async fn a_rename_away_and_back_within_the_grace_is_one_change() {
        let d = Dir::new("grace");
        let f = d.0.join("policy.yaml");
        std::fs::write(&f, "one").unwrap();
        let mut w = PolicyWatch::start(&f).unwrap();
        // An editor keeping a backup: the old file renamed away, the new one written after.
        std::fs::rename(&f, d.0.join("policy.yaml~")).unwrap();
        tokio::time::sleep(DEBOUNCE * 3).await;
        std::fs::write(&f, "two").unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
        assert_eq!(none(&mut w).await, None);
    }

    #[tokio::test]
    async fn a_configmap_update_is_a_change() {
        let d = Dir::new("configmap");
        let mut cm = ConfigMap::new(&d.0, "policy.yaml", "one");
        let mut w = PolicyWatch::start(&d.0.join("policy.yaml")).unwrap();
        cm.update("policy.yaml", "two");
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
        // Again: the watch follows the new stamped directory.
        cm.update("policy.yaml", "three");
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
        // The kubelet's resync with the same content: a swap, the same bytes.
        cm.update("policy.yaml", "three");
        assert_eq!(none(&mut w).await, None);
    }

    #[tokio::test]
    async fn a_symlink_elsewhere_is_followed_to_its_directory() {
        let d = Dir::new("elsewhere");
        std::fs::create_dir(d.0.join("real")).unwrap();
        std::fs::create_dir(d.0.join("etc")).unwrap();
        let real = d.0.join("real/prod.yaml");
        std::fs::write(&real, "one").unwrap();
        let f = d.0.join("etc/policy.yaml");
        symlink(&real, &f).unwrap();
        let mut w = PolicyWatch::start(&f).unwrap();
        std::fs::write(&real, "two").unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
        // The link pointed elsewhere.
        std::fs::write(d.0.join("real/staging.yaml"), "three").unwrap();
        std::fs::remove_file(&f).unwrap();
        symlink(d.0.join("real/staging.yaml"), &f).unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
        std::fs::write(d.0.join("real/staging.yaml"), "four").unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
    }

    #[tokio::test]
    async fn a_removed_directory_is_watched_again_when_it_is_back() {
        let d = Dir::new("rmdir");
        let sub = d.0.join("etc");
        std::fs::create_dir(&sub).unwrap();
        let f = sub.join("policy.yaml");
        std::fs::write(&f, "one").unwrap();
        let mut w = PolicyWatch::start(&f).unwrap();
        std::fs::remove_dir_all(&sub).unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Gone));
        // Back: found by the retry (nothing watches the parent).
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(&f, "two").unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
        // And watched again.
        std::fs::write(&f, "three").unwrap();
        assert_eq!(next(&mut w).await, Some(FileChange::Changed));
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_watched_is_an_error() {
        let d = Dir::new("nodir");
        let e = PolicyWatch::start(&d.0.join("missing/policy.yaml")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
